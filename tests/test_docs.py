"""The README, docs/ and the experiments' READMEs are for users: short, linked, free of the project's own
bookkeeping, and every `python train.py / evaluate.py / retrieve.py ...` they show composes. (Tables of results: tests/test_results_tables.py; commands run as
typed: tests/test_readme_commands.py and tests/test_examples.py.)"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, compose_config

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
EXPERIMENTS = sorted((ROOT / "experiments").glob("*/README.md"))
EXAMPLES = sorted((ROOT / "examples").glob("*/README.md"))
USER_PAGES = [README, *DOCS, *EXPERIMENTS, *EXAMPLES]
# wording about how the work was organised, not about the software
BOOKKEEPING = [r"\bissue \d+", r"\bissues? \d+(, \d+)*", r"\bworkspace\b", r"shared/", r"\bgoal\b", r"this environment",
               r"\bsessions?\b", r"[Ww]hat ran here", r"[Nn]ot run here", r"DESIGN\.md", r"RECIPE\.md"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_readme_is_short_with_contents_and_links() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 250, f"README.md has {len(text.splitlines())} lines (at most 250)"
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    contents = text[text.index("**Contents:**"):].split("\n\n")[0]
    for heading in headings:
        anchor = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        assert f"(#{anchor})" in contents, f"the contents line does not link to '## {heading}'"
    external = set(re.findall(r"\]\((https?://[^)]+)\)", text))
    assert len(external) >= 8, f"only {len(external)} links to the methods, datasets and tools used"


@pytest.mark.parametrize("page", USER_PAGES, ids=rel)
def test_no_bookkeeping_wording(page: Path) -> None:
    text = page.read_text()
    for pattern in BOOKKEEPING:
        hit = re.search(pattern, text)
        assert hit is None, f"{rel(page)}: '{hit.group(0)}' in: {text[max(0, hit.start() - 60): hit.end() + 60]!r}"


@pytest.mark.parametrize("page", [README, *DOCS, *EXPERIMENTS], ids=rel)
def test_relative_links_resolve(page: Path) -> None:
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (page.parent / target).exists(), f"{rel(page)}: the link to {target} leads nowhere"


SCRIPTS = {"train": "train", "evaluate": "eval", "retrieve": "retrieve"}  # script -> its config


def _commands(text: str, script: str = "train") -> list[str]:
    """`python <script>.py ...` in code blocks (to the end of the line or a comment, backslash continuations joined)
    and in inline code spans (which may wrap)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)
    commands = [m for b in blocks for m in re.findall(rf"((?:PYTHONPATH=\S+ )?python {script}\.py[^\n#]*)",
                                                      re.sub(r"\\\n\s*", " ", b))]
    prose = re.sub(r"^```[a-z]*\n.*?^```", "", text, flags=re.M | re.S)
    commands += re.findall(rf"`(python {script}\.py[^`]*)`", prose)
    return sorted({" ".join(c.split()) for c in commands if "--help" not in c})  # --help: tests/test_help.py


COMMANDS = [(page, command) for page in [README, *DOCS, *EXPERIMENTS] for script in SCRIPTS
            for command in _commands(page.read_text(), script)]


def _launcher_plugin() -> bool:
    return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None


def test_the_pages_show_commands() -> None:
    assert sum(page == README for page, _ in COMMANDS) >= 10 and len(COMMANDS) >= 20
    assert sum(".py " in c and "train.py" not in c for _, c in COMMANDS) >= 8  # evaluate.py and retrieve.py


@pytest.mark.parametrize(("page", "command"), COMMANDS,
                         ids=[f"{rel(p)}: {c.split('python ')[1][:70]}" for p, c in COMMANDS])
def test_every_command_composes(page: Path, command: str, tmp_path: Path, cache_dir: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """What `python train.py <overrides> --cfg job` would compose (evaluate.py, retrieve.py likewise), the typed
    checks every run makes first, and the model's input builder and module a training run builds next (a module
    only where no weights file is named). A sweep composes its first job (`-m`, `a,b` -> a); `<date>`-style
    placeholders become a word (no file is read)."""
    # The SLURM launcher's own keys need its plugin (the `launchers` extra); without it they are left out.
    from siamese_retrieval.configs import check_config
    from siamese_retrieval.errors import instantiate_config
    from siamese_retrieval.registry import _ALL, import_user_modules

    if command.startswith("PYTHONPATH="):  # a module of the user's, registering its components when imported
        folder, command = command.split(" ", 1)
        monkeypatch.syspath_prepend(str(ROOT / folder.split("=", 1)[1]))
    words = re.sub(r"<[^>]*>", "PLACEHOLDER", command).split()  # <its checkpoint>: Hydra's grammar has no `<`
    script = words[1].removesuffix(".py")
    overrides = []
    if "--config-dir" in words:  # the user's configs: searched after the package's, as Hydra's --config-dir does
        at = words.index("--config-dir")
        overrides.append(f"hydra.searchpath=[file://{ROOT / words[at + 1]}]")
        del words[at:at + 2]
    for word in words[2:]:
        word = word.strip("'\"")
        if word in ("-m", "--multirun") or (not _launcher_plugin() and word.startswith(("hydra/launcher=",
                                                                                       "hydra.launcher."))):
            continue
        key, _, value = word.partition("=")
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        overrides.append(f"{key}={value}" if _ else word)
    cfg = compose_config(SCRIPTS[script], overrides, tmp_path, cache_dir)
    registered = {registry: dict(registry.load()._entries) for registry in _ALL.values()}
    try:
        import_user_modules(cfg.get("imports"))
        check_config(cfg, SCRIPTS[script])
        if script == "train":
            instantiate_config("model.inputs", cfg.model.inputs)
            if not cfg.model.get("weights"):
                instantiate_config("model.module", cfg.model.module, _recursive_=False)
    finally:  # the user's components leave with the test: later tests on this worker see the package's own
        for registry, entries in registered.items():
            registry._entries = entries
        for name in cfg.get("imports") or []:  # so that importing it again registers its components again
            sys.modules.pop(str(name), None)


def test_the_compose_check_can_fail(tmp_path: Path, cache_dir: Path) -> None:
    """A mistyped command in a page is caught: the same steps refuse an unknown option and a bad value."""
    from hydra.errors import MissingConfigException

    from siamese_retrieval.configs import check_config
    from siamese_retrieval.errors import ConfigError

    assert _commands("run `python train.py model=nope`\n\n```bash\npython train.py model.batch_size=abc  # x\n```") \
        == ["python train.py model.batch_size=abc", "python train.py model=nope"]
    with pytest.raises(MissingConfigException):
        compose_config("train", ["model=nope"], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match="model.batch_size=abc"):
        check_config(compose_config("train", ["model.batch_size=abc"], tmp_path, cache_dir), "train")
