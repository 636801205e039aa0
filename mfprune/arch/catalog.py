"""The family list in README.md and docs/families.md, generated from the adapters.

``python -m mfprune.arch.catalog`` rewrites both; a test fails when they drift from
``mfprune/arch/families/*.toml`` and ``mfprune/arch/unsupported.toml``.
"""

from __future__ import annotations

import re
from pathlib import Path

from mfprune.arch import builtin_specs, unsupported_families

BEGIN, END = "<!-- families:begin -->", "<!-- families:end -->"


def readme_block() -> str:
    """The README paragraph: every built-in family by name."""
    names = sorted(builtin_specs())
    return (
        f"{BEGIN}\nFamilies ({len(names)}): "
        + ", ".join(f"`{n}`" for n in names)
        + " — each a small declarative adapter (`mfprune/arch/families/*.toml`), listed with "
        "routing and head rules in [docs/families.md](docs/families.md); bring your own with "
        f"`--arch FILE`.\n{END}"
    )


def families_page() -> str:
    """docs/families.md: one row per adapter, then every family without one and why."""
    lines = [
        "# Supported families",
        "",
        "Generated from `mfprune/arch/families/*.toml` and `mfprune/arch/unsupported.toml` by",
        "`python -m mfprune.arch.catalog`; a test fails when this page drifts from them.",
        "Each adapter is checked by the exactness test on a tiny model built from its",
        "transformers config (tests/test_rewrite_exact.py).",
        "",
        "| family | model_type | heads | what it is |",
        "|---|---|---|---|",
    ]
    for name, spec in sorted(builtin_specs().items()):
        heads = "no: " + spec.heads.unsupported if spec.heads.unsupported else "yes"
        if not spec.heads.unsupported and not spec.heads.tensors:
            heads = "no"
        types = ", ".join(f"`{t}`" for t in spec.model_types)
        lines.append(f"| `{name}` | {types} | {heads} | {spec.description} |")
    lines += [
        "",
        "## Not supported yet",
        "",
        "MoE families in the installed transformers without an adapter, and why. Pass your own",
        "adapter with `--arch FILE` (docs/adding-an-architecture.md) where the reason is only",
        "that none is written.",
        "",
        "| model_type | why |",
        "|---|---|",
    ]
    lines += [f"| `{mt}` | {why} |" for mt, why in sorted(unsupported_families().items())]
    return "\n".join(lines) + "\n"


def with_readme_block(readme: str) -> str:
    """``readme`` with its family block replaced by the current one."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise ValueError(f"README.md has no {BEGIN} ... {END} block")
    return pattern.sub(lambda _m: readme_block(), readme)


def main(root: Path = Path(".")) -> None:
    readme = root / "README.md"
    readme.write_text(with_readme_block(readme.read_text("utf-8")), "utf-8")
    (root / "docs" / "families.md").write_text(families_page(), "utf-8")


if __name__ == "__main__":
    main()
