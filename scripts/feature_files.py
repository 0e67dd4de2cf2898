"""Which files outside a feature's own modules name it in their code: the spread that docs/architecture.md holds
to at most four files per feature (vLLM, LoRA, DDP/FSDP2, MoE routing replay).

A file names a feature when its code (not a docstring or comment) uses one of the feature's names: an
identifier, an attribute (a config key such as `.lora_r`), a name it imports, or a string constant (a config
key or value such as "vllm"). Importing a feature's module under a name of no feature (say `gradus.parallel`'s
rank helpers, which every distributed path uses) is not counted: the count is of code that decides on the
feature, a proxy, not a dependency graph (`farm-studio look` draws that). Tests are left out, and so is the
config: `config.py` (with `config_aliases.py`), which declares every feature's keys, and `config_checks.py`, its
one validation, which by design holds every feature's config rules (so that all are checked before any work).
Run from the repository root:

    python scripts/feature_files.py     # exit 1 when a feature touches more than MOST files
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path("src/gradus")
# the one typed config, the names other trainers give its keys, and its one validation
CONFIG = ("config.py", "config_aliases.py", "config_checks.py")
MOST = 4  # files outside its own modules that a feature may touch (docs/architecture.md)

# feature -> (its own modules, the names that mean it: its keys, values, classes and functions)
FEATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vLLM": (("rollout/vllm_engine.py",),
             ("vllm", "VLLMEngine", "VLLMSettings", "VLLMConfig", "vllm_engine", "import_vllm")),
    "LoRA": (("models/lora.py",),
             ("lora", "peft", "PeftModel", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "apply_lora",
              "load_lora", "merged_tensors", "is_lora", "disable_adapter", "adapter_base", "plain_model_dir")),
    "DDP/FSDP2": (("parallel/__init__.py", "parallel/modes.py", "parallel/checkpoint.py"),
                  ("ddp", "fsdp2", "DDP", "FSDP2", "DistributedDataParallel", "fully_shard", "FSDPModule",
                   "is_sharded", "unwrap_ddp", "shard")),
    "MoE routing replay": (("train/moe.py", "models/routing.py", "rollout/routing_record.py"),
                           ("routing_replay", "MoeRouting", "routed_experts", "router_aux_coef", "records_routing",
                            "record_routing", "r2", "r3")),
}


def code_names(tree: ast.AST) -> set[str]:
    """Every identifier, attribute, imported module part and string constant of the code, docstrings left out."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            names.update(part for m in modules if m for part in m.split("."))
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.add(node.value)
            names.update(node.value.replace("=", ".").split("."))  # "algo.routing_replay" -> its parts
    return names


def touches(feature: str) -> list[str]:
    own, words = FEATURES[feature]
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel in own or rel in CONFIG:
            continue
        if code_names(ast.parse(path.read_text())) & set(words):
            found.append(rel)
    return found


def main() -> int:
    if not SRC.is_dir():
        print("run from the repository root", file=sys.stderr)
        return 2
    over = []
    for feature in FEATURES:
        files = touches(feature)
        print(f"{feature}: the config and {len(files)} file(s) outside {', '.join(FEATURES[feature][0])}: "
              f"{', '.join(files)}")
        if len(files) > MOST:
            over.append(feature)
    if over:
        print(f"more than {MOST} files: {', '.join(over)}", file=sys.stderr)
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
