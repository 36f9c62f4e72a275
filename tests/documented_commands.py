"""The commands README.md and docs/*.md show, and the rules that shrink each to a CI-sized run.

:func:`documented_commands` reads every ``symensemble ...`` / ``torchrun ...`` line of the
markdown code blocks (``$ `` prompts and trailing ``# comments`` dropped, ``\\`` continuations
joined). :func:`concrete_commands` turns the few written in pseudo-syntax (``[--data PATH]``,
``a | b``, ``1,2,...,16``) into real ones via :data:`EXPAND`; :func:`shrink` then makes each one
small, per subcommand, by overriding or appending options (:data:`SHRINK`):

* every command runs on a tiny synthetic CIFAR-like tree (``--data`` replaced or added) and
  writes into a temp folder (``--out``);
* ``attack``: ``--n 4``, ``--num-members 2``, ``--apgd-steps 2``, ``--transfer-steps 2``,
  ``--square-queries`` at most 10, ``--batch-size 4``, ``--no-sanity``;
* ``reproduce``: ``--n 4``, ``--no-sanity``, a copy of the recipe with 2 members per ensemble
  (``paper_fig10``: a 2 × 2 grid of num_members × ensemble eps instead of 7 × 7; :data:`RECIPE_SHRINK`);
* ``train``: ``--epochs 1``, ``--batch-size 32``, a copy of the recipe with ``val_size = 30``
  (the tree has 300 training images); ``--download`` is dropped (the tree is local);
* ``q``: ``--steps`` 30; ``hessian`` on widths m, h, n = 3, 5, 2; ``distribution`` 2 samples
  of one small configuration;
  ``teleport`` with ``--samples 16``, ``--max-evals 2``, ``--lanczos-iters 2``;
* ``attack --model SPEC --weights W``: a file ``W`` that does not exist is replaced by a state
  dict of the spec's freshly built model (:func:`weights_for`); ``robustbench:`` specs skip when
  the optional ``robustbench`` package is missing;
* ``torchrun`` lines run with ``--nproc_per_node 1`` (2 ranks are tested by
  ``tests/test_distributed.py`` and ``tests/test_train_ddp.py``).

``tests/test_documented_commands.py`` checks these rules against the docs both ways, so a
command added to the docs without a rule, or a rule whose command left the docs, fails.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

#: README's wrapped-model command (a resnet18: its default s = 2C does not fit the test tree).
_WRAP = ("symensemble attack --model torchvision:resnet18 --weights resnet18_cifar10.safetensors "
         "--num-classes 10 --normalize cifar10 --transforms original,group --num-members 40 "
         "--ensemble-eps 1")
#: Documented lines in pseudo-syntax → the real commands they stand for.
EXPAND: dict[str, list[str]] = {
    "symensemble train --recipe recipes/paper_cnn.toml [--data PATH] [--epochs N] [--seed S]":
        ["symensemble train --recipe recipes/paper_cnn.toml --data PATH --epochs 1 --seed 3"],
    "symensemble q dynamics | distribution | convergence --kind radial | hessian":
        ["symensemble q dynamics", "symensemble q distribution",
         "symensemble q convergence --kind radial", "symensemble q hessian"],
    "symensemble q teleport paper_cnn --unit-targets 1,2,...,16":
        ["symensemble q teleport paper_cnn --unit-targets " + ",".join(map(str, range(1, 17)))],
    # s = 2C = 1024 calibration images per member exceed the 300-image tree: 16 each (s ≤ C)
    _WRAP: [_WRAP + " --samples-per-member 16"],
}
#: Lines of code blocks that look like commands but are diagrams (docs/architecture.md).
NOT_COMMANDS = ("→", " commands/")
#: Shipped recipes too large for CI → the values their shrunk copy uses (first ``key = ``
#: line replaced, i.e. the [evaluate] table's, else the key is added at the top).
RECIPE_SHRINK = {"paper_fig10": {"num_members": "[2, 3]", "ensemble_eps": "[1.0, 0.1]"},
                 "paper_fig11_fgsm": {"num_members": "2"}, "paper_fig11_pgd": {"num_members": "2"},
                 "paper_cnn": {"val_size": "30"}}

#: Per subcommand: options set to a small value (replaced if given, else appended).
SHRINK: dict[str, dict[str, str]] = {
    "attack": {"--n": "4", "--num-members": "2", "--apgd-steps": "2", "--transfer-steps": "2",
               "--batch-size": "4"},
    "reproduce": {"--n": "4"},
    "train": {"--epochs": "1", "--batch-size": "32"},
    "q dynamics": {"--steps": "30"},
    "q distribution": {"--samples": "2", "--config": "6,4,5,identity"},
    "q convergence": {"--steps": "30"},
    "q hessian": {"--steps": "30", "--m": "3", "--h": "5", "--n": "2"},
    "q teleport": {"--samples": "16", "--max-evals": "2", "--lanczos-iters": "2"},
    "q inspect": {},
}
#: Flags added (sanity checks and figures have tests of their own: test_evaluate, test_report).
FLAGS = {"attack": ("--no-sanity",), "reproduce": ("--no-sanity",)}
#: Options capped rather than set (``--square-queries 1000`` → 10).
CAP = {"--square-queries": 10}
#: Flags dropped (they would reach the network).
DROP = ("--download",)
#: Subcommands that take --data and --out (a folder, or a file for train/teleport).
DATA = ("attack", "reproduce", "train", "q teleport")
OUT_FILE = ("train", "q teleport")


def _blocks(text: str) -> list[str]:
    return re.findall(r"```[^\n]*\n(.*?)```", text, re.S)


def documented_commands() -> list[tuple[str, str]]:
    """(file name, command) for every command line of every markdown code block, in order."""
    out = []
    for path in DOCS:
        for block in _blocks(path.read_text()):
            lines = block.splitlines()
            i = 0
            while i < len(lines):
                line = lines[i]
                while line.rstrip().endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line.rstrip()[:-1] + " " + lines[i].strip()
                i += 1
                text = line.strip().removeprefix("$").strip()
                if not re.match(r"(symensemble|torchrun)\b", text):
                    continue
                if any(mark in text for mark in NOT_COMMANDS):
                    continue
                text = re.sub(r"\s+#\s.*$", "", text).strip()  # trailing comment
                out.append((path.name, re.sub(r"\s+", " ", text)))
    return out


def concrete_commands() -> list[str]:
    """Every documented command as runnable text (pseudo-syntax expanded), without duplicates."""
    out: list[str] = []
    for _, text in documented_commands():
        for cmd in EXPAND.get(text, [text]):
            if cmd not in out:
                out.append(cmd)
    return out


def _subcommand(args: list[str]) -> str:
    return " ".join(args[:2]) if args[0] == "q" else args[0]


def _set(args: list[str], flag: str, value: str) -> list[str]:
    """``flag value`` replaced in ``args`` (or appended)."""
    if flag in args:
        i = args.index(flag)
        return [*args[:i + 1], value, *args[i + 2:]]
    return [*args, flag, value]


def split_torchrun(text: str) -> tuple[list[str], list[str]]:
    """(torchrun's own arguments with one process, the symensemble arguments) of a line."""
    words = shlex.split(text)
    if words[0] != "torchrun":
        return [], words[1:]
    cut = words.index("--")
    runner = _set(words[1:cut], "--nproc_per_node", "1")
    return runner, words[cut + 2:]  # after `--` comes `symensemble`


def shrink(args: list[str], data: Path, out: Path) -> list[str]:
    """The symensemble arguments (without the program name) made CI-sized (see the module doc)."""
    args = [a for a in args if a not in DROP]
    sub = _subcommand(args)
    for flag, value in SHRINK[sub].items():
        args = _set(args, flag, value)
    args += [f for f in FLAGS.get(sub, ()) if f not in args]
    for flag, cap in CAP.items():
        if flag in args:
            args = _set(args, flag, str(min(cap, int(args[args.index(flag) + 1]))))
    if sub in DATA:
        args = _set(args, "--data", str(data))
    target = out / "model.safetensors" if sub in OUT_FILE else out / "run"
    return _set(args, "--out", str(target))


def shrink_recipe(args: list[str], folder: Path) -> list[str]:
    """A recipe named in :data:`RECIPE_SHRINK` (``reproduce NAME``, ``train --recipe PATH``)
    replaced by a shrunk copy in ``folder``."""
    i = args.index("--recipe") + 1 if "--recipe" in args else 1
    name = Path(args[i]).stem
    if name not in RECIPE_SHRINK:
        return args
    text = (REPO / "recipes" / f"{name}.toml").read_text()
    for key, value in RECIPE_SHRINK[name].items():
        text, count = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text, count=1)
        if not count:
            text = f"{key} = {value}\n{text}"
    copy = folder / f"{name}.toml"
    copy.write_text(text)
    return [*args[:i], str(copy), *args[i + 1:]]


def weights_for(args: list[str], folder: Path) -> list[str]:
    """``--weights W`` of a ``--model`` spec: a missing ``W`` (a placeholder of the docs) becomes
    the state dict of the spec's model as built (random weights), saved in ``folder``."""
    if "--weights" not in args or "--model" not in args:
        return args
    path = Path(args[args.index("--weights") + 1]).expanduser()
    if path.is_file():
        return args
    import torch

    from symensemble.models.foreign import load_foreign_model

    classes = int(args[args.index("--num-classes") + 1]) if "--num-classes" in args else None
    model = load_foreign_model(args[args.index("--model") + 1], num_classes=classes)
    torch.save(model.state_dict(), folder / "weights.pt")
    return _set(args, "--weights", str(folder / "weights.pt"))
