"""The networks: the ViT (`vit`), its attention (`attention`) and the MAE around it (`mae`).

Shape suffixes. In models/, ops/ and transfer/ (and their public loss API) an array's name ends with its
axes, one capital letter each, in order: `x_BND` is [batch, tokens, width]. The letters:

  B  batch                          L  layers (the encoder's depth)
  S  selected (transferred) layers  H  attention heads
  N  tokens (queries or keys)       D  model width
  K  head dim (D / H)               F  MLP hidden width
  P  patches                        T  visible (kept) patches, MAE
  E  prefix tokens (cls, registers) Q  pixel values in one patch (p * p * C)
  Y  image rows                     X  image columns
  C  image channels                 V  classes
  R  residual branches of a block (attention, MLP)

H is never height. A size-1 axis kept for broadcasting is written with the letter of the axis it
broadcasts against (a [1, 1, D] table added to [B, N, D] tokens is `table_BND`). A function that takes
any leading axes names the trailing ones (`q_NHK` is [..., N, H, K]). Scalars and arrays whose layout is
obvious from one line need no suffix.
"""

SHAPE_LETTERS = "BLSHNDKFPTEQYXCVR"
