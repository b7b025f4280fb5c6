"""S3Gen: speech tokens -> 24 kHz waveform (flow matching + HiFT vocoder)."""
from .const import S3GEN_SIL, S3GEN_SR
from .s3gen import S3Token2Mel, S3Token2Wav
from .s3gen import S3Token2Wav as S3Gen

__all__ = ["S3Gen", "S3Token2Mel", "S3Token2Wav", "S3GEN_SR", "S3GEN_SIL"]
