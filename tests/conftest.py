import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(int(os.environ.get("INTERP_TEST_THREADS", "2")))  # 1 when the machine is shared
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model  # noqa: E402

from interp.models import load_model  # noqa: E402
from interp.organism import World, checkpoint_path  # noqa: E402
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


def same_results(recorded: Path, produced: Path, names: tuple[str, ...], ignore=("settings", "timings")) -> list[str]:
    """Where two result folders differ: every field of the named JSON / JSONL files, text and
    integers exactly, floats to float32 precision (1e-5 relative or 1e-4 absolute: the recorded
    files come from float32 forwards on one CPU, and another CPU's kernels sum in another order,
    which moves logits by up to about 4e-5 — measured on two machine types; any change of method
    moves them by far more), fields in ``ignore`` (paths, timings) skipped."""
    import json
    import math

    diffs: list[str] = []

    def walk(a, b, where):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted((set(a) | set(b)) - set(ignore)):
                if k not in a or k not in b:
                    diffs.append(f"{where}.{k}: present on one side only")
                else:
                    walk(a[k], b[k], f"{where}.{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{where}[{i}]")
        elif isinstance(a, float) and isinstance(b, float):
            if not (a == b or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-4) or (math.isnan(a) and math.isnan(b))):
                diffs.append(f"{where}: {a!r} recorded, {b!r} now")
        elif a != b:
            diffs.append(f"{where}: {a!r} recorded, {b!r} now")

    for name in names:
        read = [(p.read_text().splitlines() if name.endswith(".jsonl") else [p.read_text()]) for p in
                (recorded / name, produced / name)]
        walk(*([json.loads(x) for x in lines if x.strip()] for lines in read), name)
    return diffs


ROW_NORM_TOL = 1e-5
"""The toolkit's promise for activations against a plain Hugging Face forward (fp32, any backend,
batched or alone, any padding side): every element within this fraction of the L2 norm of its
own position's activation vector. Measured worst cases: 1.1e-7 on the tiny models, 1.5e-6 on
SmolLM2-135M, whose first-token activations reach 2.5e4 (absolute differences up to 1.1e-3)."""


def assert_within_row_norm(actual: torch.Tensor, expected: torch.Tensor, rel: float = ROW_NORM_TOL) -> None:
    """``|actual - expected| <= rel * ||expected||_2`` elementwise, the norm taken over the last
    dimension (d_model) of each position."""
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    worst = ((actual - expected).abs().amax(-1) / expected.norm(dim=-1).clamp_min(1e-30)).max().item()
    assert worst <= rel, f"max |difference| is {worst:.2e} of the row norm (allowed {rel:.0e})"


# --------------------------------------------------------------------------------------------
# The shipped organism, for the tests that run on it


@pytest.fixture(scope="module")
def world():
    """The organism's world (seed 0), which its shipped checkpoints were trained on."""
    return World(0)


@pytest.fixture(scope="module")
def finetuned():
    """The shipped fine-tuned organism."""
    return load_model(checkpoint_path("organism-finetuned"))


def tasks(world, split: str, n: int) -> list[Transcript]:
    """``n`` tasks of each label from ``split`` of ``world``, as transcripts."""
    return [t.transcript() for t in world.sample(split, n)]

