"""One loading module: every model/tokenizer spec goes through fastrm.loading, local paths only, clear errors."""

import ast
import time
from pathlib import Path

import pytest
import torch

from fastrm.loading import LoadError, load_model, load_tokenizer
from fastrm.synthetic import byte_tokenizer


def test_preset_config_file_and_checkpoint_load_through_one_function(tmp_path):
    tok = byte_tokenizer()
    torch.manual_seed(0)
    m = load_model("tiny-llama", tokenizer=tok)
    assert m.backbone.config.vocab_size >= len(tok) and m.tokenizer is tok
    m.save_pretrained(tmp_path / "ckpt", tokenizer=tok)
    back = load_model(tmp_path / "ckpt")
    torch.testing.assert_close(back.score.weight, m.score.weight)
    assert back.tokenizer is not None  # the checkpoint's own tokenizer came with it
    cfg = tmp_path / "cfg.json"
    cfg.write_text(
        '{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, '
        '"num_attention_heads": 2, "vocab_size": 300}'
    )
    assert load_model(cfg).backbone.config.hidden_size == 32


def test_unknown_model_and_tokenizer_paths_are_local_errors_without_hub_contact(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(LoadError, match="no such file or folder"):
        load_model("some-org/some-model")
    with pytest.raises(LoadError, match="no such file or folder"):
        load_tokenizer("some-org/some-tokenizer")
    with pytest.raises(LoadError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    with pytest.raises(LoadError, match="pass --tokenizer"):
        load_tokenizer(None, "tiny-llama")
    assert time.perf_counter() - t0 < 5  # a hub lookup would wait for the network


def import_graph(root: Path) -> dict[str, set[str]]:
    """{module: the fastrm modules it imports}, from every import statement in the file (function-level ones too,
    since a lazy import only hides a cycle): ``import fastrm.x``, ``from fastrm.x import y``, ``from fastrm import
    x`` (the submodule x, or the package itself when x is a name defined in ``fastrm/__init__.py``) and relative
    imports; not those under ``if TYPE_CHECKING:``, which only annotations see."""
    files = {}
    for p in root.rglob("*.py"):
        files[".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")] = p
    graph = {}
    for mod, p in files.items():
        package = mod if p.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for annotations only, never executed
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                node.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # from . import x / from ..y import z
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                if base == "fastrm" or base.startswith("fastrm."):
                    deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name == "fastrm" or a.name.startswith("fastrm.")}
        graph[mod] = deps - {mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    seen, stack = set(), []

    def visit(m):
        if m in stack:
            return stack[stack.index(m) :] + [m]
        if m in seen:
            return None
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if (cycle := visit(d)) is not None:
                return cycle
        stack.pop()
        seen.add(m)
        return None

    for m in sorted(graph):
        if (cycle := visit(m)) is not None:
            return cycle
    return None


def test_no_import_cycle_in_the_package():
    """fastrm's modules import each other in one direction only (reviews found model <-> presets, data <-> chat)."""
    graph = import_graph(Path(__file__).resolve().parents[1] / "fastrm")
    assert "fastrm.chat" in graph["fastrm.integrations.trl_data"]  # `from fastrm import chat` is an edge
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_sees_every_import_form(tmp_path):
    """The forms the package writes imports in, each closing a planted cycle (the check once skipped
    `from fastrm import x`, so data <-> chat went unseen)."""
    forms = {
        "from fastrm import b": "b",
        "import fastrm.b": "b",
        "from fastrm.b import f": "b",
        "from . import b": "b",
        "from .b import f": "b",
        "def g():\n    from fastrm import b": "b",  # a lazy import still closes the cycle
        "from fastrm import VERSION": "__init__",  # a name of the package: the edge goes to fastrm itself
    }
    for i, (line, target) in enumerate(forms.items()):
        root = tmp_path / str(i) / "fastrm"
        root.mkdir(parents=True)
        (root / "__init__.py").write_text("VERSION = 1\n" + ("from fastrm import a\n" if target == "__init__" else ""))
        (root / "a.py").write_text(line + "\n")
        (root / "b.py").write_text("def f(): pass\n" if target == "__init__" else "from fastrm import a\n")
        assert find_cycle(import_graph(root)) is not None, line
        (root / "a.py").write_text("")
        assert find_cycle(import_graph(root)) is None, line


def _file(path, data: str | bytes):
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def _ckpt(tmp_path, weights: dict[str, bytes], config: str | None = None):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text(
        config
        or '{"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, '
        '"num_attention_heads": 2, "vocab_size": 300}'
    )
    for name, data in weights.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda t: _file(t / "w.safetensors", b"\x00" * 40),
            "{spec}: not a model fastrm can load (expected a preset (tiny-llama",
        ),
        (
            lambda t: _file(t / "my.yaml", "loss: bt\n"),
            "{spec}: not a model fastrm can load",
        ),
        (
            lambda t: _ckpt(t, {"model.safetensors": b"garbage, not a header" * 20}),
            "{spec}/model.safetensors: not a safetensors weights file (Error while deserializing header",
        ),
        (
            lambda t: _ckpt(t, {"pytorch_model.bin": b"garbage" * 20}),
            "{spec}/pytorch_model.bin: not a PyTorch weights file (no zip or pickle signature); expected an HF "
            "checkpoint folder",
        ),
        (
            lambda t: _ckpt(t, {}, config='{"model_type": "llama",\n "hidden_size": 32'),
            "{spec}/config.json: not valid JSON (line 2, column 19: Expecting ',' delimiter); expected a transformers "
            "model config.json with a known model_type",
        ),
        (
            lambda t: _ckpt(t, {}, config='{"model_type": "nosuch"}'),
            "{spec}/config.json: model_type 'nosuch' is not a model type transformers",
        ),
        (
            lambda t: _file(t / "c.json", '{"hidden_size": 3}'),
            "{spec}: no 'model_type' field; expected a transformers model config.json",
        ),
        (
            lambda t: _file(t / "m.gguf", b"not gguf" * 10),
            "{spec}: cannot be loaded as a model (ValueError: ",
        ),
    ],
    ids=[
        "weights-file",
        "yaml-file",
        "garbage-safetensors",
        "garbage-bin",
        "bad-config-json",
        "unknown-type",
        "no-model-type",
        "garbage-gguf",
    ],
)
def test_a_file_that_is_not_a_model_names_the_file_and_what_was_expected(tmp_path, make, message):
    spec = make(tmp_path)
    with pytest.raises(LoadError) as e:
        load_model(spec)
    assert str(e.value).startswith(message.format(spec=spec)), str(e.value)
    assert "no such file" not in str(e.value) and "\n" not in str(e.value)
