import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model  # noqa: E402

from interp.transcripts import Transcript  # noqa: E402

# architecture -> chat-template family of its tokenizer (two families across three architectures)
ARCHS = {"llama": "llama3", "qwen2": "chatml", "gpt2": "llama3"}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny random models, one per architecture, each with its trained tokenizer."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for arch, family in ARCHS.items():
        make_model(arch, root / arch, family=family)
        out[arch] = root / arch
    return out


TOOLS = (
    {"type": "function", "function": {"name": "click", "description": "Click an element",
                                      "parameters": {"type": "object", "properties": {"element": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "open_page", "description": "Open a URL",
                                      "parameters": {"type": "object", "properties": {"url": {"type": "string"}}}}},
)


def agent_transcript(i: int = 0, prefix: str | None = None, harmful: bool = False) -> Transcript:
    """A multi-step agent transcript: two calls in one turn, a JSON tool result, non-ASCII text."""
    words = ["café ✓", "the weekly update", "日本語のページ", "the temp cache"][i % 4]
    return Transcript.from_messages(
        [
            {"role": "system", "content": "You are a helpful agent."},
            {"role": "user", "content": f"Open the page and post {words}" + " now" * (i % 3)},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "function": {"name": "open_page", "arguments": {"url": "forum.example/ü"}}},
                {"id": "c2", "function": {"name": "click", "arguments": {"element": "post"}}}]},
            {"role": "tool", "tool_call_id": "c1", "content": '{"status": "ok", "items": [1, 2]}'},
            {"role": "tool", "tool_call_id": "c2", "content": "Posted."},
        ],
        tools=list(TOOLS), labels={"harmful": harmful}, prefix=prefix, id=f"agent-{i}",
    )


@pytest.fixture
def transcripts() -> list[Transcript]:
    """Six transcripts of different lengths, with and without a forced prefix."""
    return [agent_transcript(i, prefix="As a careful agent, I" if i % 2 else None, harmful=i % 2 == 0)
            for i in range(6)]
