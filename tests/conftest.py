import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A few lines in each language, so the tiny tokenizers see the scripts the project deals with.
TOKENIZER_TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n1. Eat a balanced diet.",
    "Hãy đưa ra ba lời khuyên để giữ gìn sức khỏe. Ăn uống cân bằng và ngủ đủ giấc.",
    "给出三个保持健康的建议。均衡饮食，保证充足的睡眠。",
    "قدم ثلاث نصائح للحفاظ على الصحة. تناول نظاما غذائيا متوازنا.",
    "The capital of France is Paris. 2 + 2 = 4. What is the boiling point of water?",
] * 8


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from model import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", "llama", TOKENIZER_TEXTS)


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory):
    from model import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "gemma2", "gemma2", TOKENIZER_TEXTS)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    from model import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "qwen2", "qwen2", TOKENIZER_TEXTS)
