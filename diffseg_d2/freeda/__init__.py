"""FreeDA's offline stage and its bank: captions -> generated images -> noun prototypes -> faiss.

Nothing heavy is imported here; faiss, skimage, timm and nltk load where they are used.
"""
from .bank import BankError, PrototypeBank
from .captions import CaptionsError, read_captions

__all__ = ["BankError", "CaptionsError", "PrototypeBank", "read_captions"]
