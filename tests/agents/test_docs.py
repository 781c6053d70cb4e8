"""Docs that cannot rot: every shell command in AGENTS.md and the skills runs, and every
skill and agent file has the fields Codex needs."""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ..pipeline.conftest import ROOT

DOCS = [ROOT / "AGENTS.md", *sorted((ROOT / ".codex" / "skills").glob("*/SKILL.md"))]
SKILLS = {"author-template", "tune-op", "metal-performance", "cuda-performance", "verify-kernel"}
AGENTS = {"template-author": None, "correctness-validator": "read-only", "benchmark-methodologist": "read-only",
          "researcher": None, "anti-cheat-reviewer": "read-only"}


def commands(path: Path) -> list[str]:
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        out += [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
    return out


def test_every_doc_has_commands():
    for doc in DOCS:
        if doc.name == "SKILL.md":
            assert commands(doc), f"{doc} cites no command"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_in_the_docs_runs(doc, tmp_path):
    env = dict(os.environ, HLH_MLX_VARIANTS=str(tmp_path / "variants"), PYTHONPATH=str(ROOT))
    for cmd in commands(doc):
        r = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{doc.name}: `{cmd}` failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


def front_matter(path: Path) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", path.read_text(), re.S)
    assert m, f"{path} has no front matter"
    return dict(line.split(": ", 1) for line in m.group(1).splitlines())


def test_skills_front_matter():
    found = {p.parent.name for p in (ROOT / ".codex" / "skills").glob("*/SKILL.md")}
    assert found == SKILLS
    for name in SKILLS:
        fm = front_matter(ROOT / ".codex" / "skills" / name / "SKILL.md")
        assert fm["name"] == name and len(name) <= 64
        assert 0 < len(fm["description"]) <= 1024


def test_agents_skills_resolve_to_the_codex_copy():
    link = ROOT / ".agents" / "skills"
    assert link.is_symlink() and link.resolve() == (ROOT / ".codex" / "skills").resolve()
    assert (link / "tune-op" / "SKILL.md").read_text() == (ROOT / ".codex/skills/tune-op/SKILL.md").read_text()


def test_agent_files():
    files = {p.stem: p for p in (ROOT / ".codex" / "agents").glob("*.toml")}
    assert set(files) == set(AGENTS)
    for name, mode in AGENTS.items():
        data = tomllib.loads(files[name].read_text())
        assert data["name"] == name
        assert data["description"].strip() and data["developer_instructions"].strip()
        assert data["sandbox_mode"] in ("read-only", "workspace-write")
        if mode:
            assert data["sandbox_mode"] == mode


def test_project_config_parses():
    cfg = tomllib.loads((ROOT / ".codex" / "config.toml").read_text())
    assert cfg["sandbox_mode"] in ("read-only", "workspace-write")


def test_the_readme_documents_every_setting():
    """One table of settings: the README's copy is the one hlh_mlx.config prints, and every
    HLH_MLX_* variable the package reads is in it."""
    import re

    from hlh_mlx import config
    readme = (ROOT / "README.md").read_text()
    assert config.table() in readme
    used = set()
    for path in (ROOT / "hlh_mlx").rglob("*.py"):
        used |= set(re.findall(r"HLH_MLX_[A-Z_]+[A-Z]", path.read_text()))
    assert used <= set(config.KNOBS), f"undocumented settings: {sorted(used - set(config.KNOBS))}"


def test_every_python_snippet_in_the_readme_runs_as_pasted(tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(snippets) >= 2
    env = dict(os.environ, HLH_MLX_VARIANTS=str(tmp_path / "variants"), PYTHONPATH=str(ROOT))
    for code in snippets:
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"README snippet failed:\n{code}\n{r.stderr[-2000:]}"
