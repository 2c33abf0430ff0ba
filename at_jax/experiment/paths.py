"""Where a run keeps what it makes: the paths under its workdir, in one place."""

TEACHER_DIR = "teacher"  # <workdir>/teacher: where a config's teacher.pretrain is trained
# <run workdir>/checkpoints: the orbax checkpoints a relaunch resumes
CHECKPOINT_DIR = "checkpoints"


EXPORT_DIR = "params"  # <run workdir>/params: the final params export, usable as teacher.init
# <run workdir>/params_ema: the final EMA params, exported as EXPORT_DIR is (the same model_config.json),
# so teacher.init, model.init and launch/evaluate.py --ensemble take either.
EMA_EXPORT_DIR = "params_ema"
# <job workdir>/results.json: the job's evals (the student's, and the teacher's beside them), written
# when it finishes; in <workdir>/teacher it marks a pre-trained teacher whose run is complete.
RESULTS_FILE = "results.json"
