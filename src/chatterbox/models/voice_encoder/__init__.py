from .config import VoiceEncConfig
from .voice_encoder import VoiceEncoder

__all__ = ["VoiceEncoder", "VoiceEncConfig"]
