"""Render the config reference (docs/config_reference.md) from the schema's field docstrings.

    python -m dpo_rl.config.reference > docs/config_reference.md
"""

from __future__ import annotations

import ast
import dataclasses
import inspect

from dpo_rl.config import model, schema

SECTIONS = [
    ("`training:`", schema.TrainingConfig, "Run-wide settings; its role fields are defaults for every role."),
    ("Role settings, every role (`actor_rollout_ref.actor_rollout:`, `actor_rollout_ref.ref:`, `reward:`)",
     schema.RoleBase, "Each role's section overrides `training`. A key of a group the role does not read in the "
     "chosen stage is an error naming the section it belongs in."),
    ("Role settings: the trained role", schema.OptimizerSettings,
     "Read by the role the stage trains: the actor (`ray_online_dpo`, `dpo`, `sft`) or the reward model (`reward`)."),
    ("Role settings: the trained role's `lora:`", schema.LoRASettings,
     "A `lora:` section in `training:` (the default) or in the trained role's own section, e.g. "
     "`actor_rollout_ref.actor_rollout.lora.enabled=true`; docs/lora.md maps the ms-swift and LLaMA-Factory keys."),
    ("Role settings: the sampling role", schema.SamplingSettings, "Read by the online actor (`ray_online_dpo`)."),
    ("Role settings: the online actor", schema.OnlineActorSettings,
     "Read by the online actor (`ray_online_dpo`); `clip_ratio` is accepted anywhere and reported as unused."),
    ("`algorithm:`", schema.AlgorithmConfig, ""),
    ("`data:`", schema.DataConfig, ""),
    ("`resource_pool:`", schema.ResourcePoolConfig, ""),
    ("`ray:`", schema.RayConfig, ""),
    ("`configs/rlxf/model/<name>.yaml`", model.ModelConfig, "One top-level key, the model name, holding these fields."),
]


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each dataclass field (this class and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(inspect.getsource(klass))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def render() -> str:
    lines = ["# Config reference", "",
             "Generated from the schema (`python -m dpo_rl.config.reference > docs/config_reference.md`).", ""]
    for title, cls, intro in SECTIONS:
        lines += [f"## {title}", ""] + ([intro, ""] if intro else [])
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name not in docs:
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
            default = "required" if str(default) == "???" else f"`{default}`"
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"| `{f.name}` | `{kind}` | {default} | {docs[f.name].replace('|', '/')} |")
        lines.append("")
    lines += ["## Replaced keys", "", "A config that still sets one of these is refused with this message.", "",
              "| key | instead |", "|---|---|"]
    lines += [f"| `{key}` | {instead.replace('|', '/')} |" for key, instead in schema.MOVED_KEYS.items()]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
