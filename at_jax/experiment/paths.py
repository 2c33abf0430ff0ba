"""Where a run keeps what it makes: the paths under its workdir, in one place."""

TEACHER_DIR = "teacher"  # <workdir>/teacher: where a config's teacher.pretrain is trained


EXPORT_DIR = "params"  # <run workdir>/params: the final params export, usable as teacher.init
