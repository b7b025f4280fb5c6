"""S3Gen constants."""

S3GEN_SR = 24000  # output sample rate, and the rate of the reference mel
S3GEN_SIL = 4299  # a "silence" speech token (Turbo appends three of them)
