"""The documentation against the code: every CLI command and option is on docs/cli.md, every
relative link leads to a file (and heading) that exists, every fully qualified `ditrt.` name the
docs cite exists, and the code examples of docs/extending.md run and give the right numbers
(against the official golden runs and PyTorch, not against themselves)."""
from __future__ import annotations

import importlib
import json
import re
import shutil

import click
import numpy as np
import pytest

from conftest import ROOT, max_rel_err

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks (links and names in code are not claims about files)."""
    return FENCE.sub("", text)


# ---- the CLI page ------------------------------------------------------------------------------------

def cli_sections() -> dict[str, str]:
    """docs/cli.md by `## ` heading."""
    sections, heading = {}, ""
    for line in (DOCS / "cli.md").read_text().splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        sections[heading] = sections.get(heading, "") + line + "\n"
    return sections


def mentions(text: str, flag: str) -> bool:
    """`flag` as a whole token: --verify is not found in --no-verify, nor --max-batch in --max-batches."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def command_names(command: click.Command) -> list[str]:
    """What a reader of the page must find for a command: each option's names (primary and
    secondary, e.g. --verify and --no-verify) and each argument's metavar (ARTIFACT)."""
    names = []
    for param in command.params:
        if isinstance(param, click.Option):
            names += [*param.opts, *param.secondary_opts]
        else:
            names.append(param.human_readable_name)
    return names


def missing_from_cli_page(main: click.Group, sections: dict[str, str]) -> list[str]:
    page = "".join(sections.values())
    missing = [name for name in command_names(main) + list(main.get_help_option(click.Context(main)).opts)
               if not mentions(page, name)]
    for name, command in sorted(main.commands.items()):
        section = next((text for heading, text in sections.items() if f"`ditrt {name}`" in heading), None)
        if section is None:
            missing.append(f"a section `## \\`ditrt {name}\\``")
            continue
        missing += [f"ditrt {name} {flag}" for flag in command_names(command) if not mentions(section, flag)]
    return missing


def test_every_command_and_option_is_on_the_cli_page():
    from ditrt.cli import main
    assert len(main.commands) >= 8
    assert missing_from_cli_page(main, cli_sections()) == []


def test_the_cli_page_check_sees_a_missing_option():
    """The check is real: a section without one option's line, or without --no-verify, is caught."""
    from ditrt.cli import main
    sections = cli_sections()
    sample = next(h for h in sections if "`ditrt sample`" in h)
    cut = dict(sections, **{sample: "\n".join(line for line in sections[sample].splitlines()
                                               if "--decoder-precision" not in line)})
    assert missing_from_cli_page(main, cut) == ["ditrt sample --decoder-precision"]
    cut = dict(sections, **{sample: sections[sample].replace("--no-verify", "--no-check")})
    assert missing_from_cli_page(main, cut) == ["ditrt sample --no-verify"]


# ---- links -----------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: formatting backticks dropped, lower case, punctuation other
    than - and _ removed, spaces to -."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path) -> set[str]:
    found, seen = set(), {}
    for line in prose(path.read_text()).splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            base = slug(m[1])
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def test_every_relative_link_points_to_an_existing_file_and_heading():
    assert len(PAGES) >= 10
    assert [b for page in PAGES for b in broken_links(page)] == []


def test_the_link_check_sees_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading) [web](https://example.com) [gone](missing.md)\n"
                    "[bad anchor](there.md#nowhere)\n```\n[in code](ignored.md)\n```\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)", "page.md: there.md#nowhere (no such heading)"]


# ---- python names ------------------------------------------------------------------------------------

# Backticked dotted names that are not Python objects.
NOT_PYTHON = {"ditrt.backends": "the entry-point group backend plugins register under",
              "ditrt.manifest": "the manifest's schema name",
              "ditrt.hpp": "the C++ runtime's header",
              "ditrt.generate": "the generate run record's schema name",
              "ditrt.serve.access": "the server's access-log logger name"}
NAME = re.compile(r"`(ditrt(?:\.[A-Za-z_]\w*)+)(?=[`(\s\[])")


def cited_names(page) -> set[str]:
    return {name for name in NAME.findall(prose(page.read_text())) if name not in NOT_PYTHON}


def resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_every_qualified_name_the_docs_cite_exists():
    cited = {page.name: cited_names(page) for page in PAGES}
    assert len(cited["extending.md"]) >= 30
    assert sorted(f"{page}: {name}" for page, names in cited.items() for name in names if not resolves(name)) == []


def test_the_name_check_sees_a_name_that_does_not_exist():
    assert resolves("ditrt.runtime.sampling.samplers.register_sampler") and resolves("ditrt.runtime.jobs.outputs.OutputPlan.write")
    assert not resolves("ditrt.runtime.sampling.samplers.register_samplers")
    assert not resolves("ditrt.runtime.sampler.Sampler")


# ---- the examples of docs/extending.md ---------------------------------------------------------------

def example(name: str) -> str:
    """The python block after `<!-- tested: NAME -->` in docs/extending.md."""
    text = (DOCS / "extending.md").read_text()
    m = re.search(rf"<!-- tested: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert m, f"docs/extending.md has no tested block {name!r}"
    return m[1]


def test_the_sampler_example_reproduces_the_official_ddim_run(tiny_artifact, golden):
    """Euler on the probability-flow ODE over the ddim10 chain is DDIM eta 0: the official golden run."""
    from ditrt import runtime
    from ditrt.runtime.sampling.samplers import SAMPLERS
    before = set(SAMPLERS)
    try:
        exec(example("sampler"), {})
        assert SAMPLERS["euler"].family == "dit"
        pipe = runtime.load(tiny_artifact, backend="onnxruntime-fp32")
        out = pipe.sample([3, 7], num_steps="ddim10", sampler="euler", cfg_scale=4.0, guidance="official",
                          noise=(golden["ddpm_initial_noise"], None), progress=False)
        assert pipe.last_stats.steps == 10
        assert max_rel_err(out, golden["ddim_samples"]) <= 1e-4  # measured 4e-7
        with pytest.raises(runtime.InputError, match="takes no eta"):
            pipe.sample([3], num_steps=10, sampler="euler", eta=0.5, progress=False)
    finally:
        for name in set(SAMPLERS) - before:
            del SAMPLERS[name]


def test_the_backend_example_reproduces_the_official_ddpm_run(tiny_artifact, golden):
    from ditrt import runtime
    from ditrt.runtime.execution.backends import BACKENDS, backend_ids
    before = set(BACKENDS)
    try:
        exec(example("backend"), {})
        assert {"ortcpu-fp32", "ortcpu-fp16"} <= set(backend_ids())
        pipe = runtime.load(tiny_artifact, backend="ortcpu")
        assert pipe.backend.name == "ortcpu-fp32" and pipe.backend.device == "cpu"
        out = pipe.sample([3, 7], num_steps="10", sampler="ddpm", cfg_scale=4.0, guidance="official",
                          noise=(golden["ddpm_initial_noise"], golden["ddpm_step_noise"]), progress=False)
        assert max_rel_err(out, golden["ddpm_samples"]) <= 1e-4
    finally:
        for name in set(BACKENDS) - before:
            del BACKENDS._kinds[name]


def test_the_network_example_exports_loads_and_decodes(tiny_artifact, tmp_path, monkeypatch):
    """The spec, the exporter and the cross-check of docs/extending.md: a small latent-to-image model
    through the one export loop into a copy of the tiny artifact, read back by role through the
    manifest, decoded on ONNX Runtime against PyTorch; a wrong latent shape is refused at load."""
    import torch

    from ditrt import runtime
    from ditrt.exporter.onnx_export import Steps, export_network
    from ditrt.runtime.artifact import manifest as manifest_module
    from ditrt.runtime.spec import networks
    from ditrt.runtime.execution.pipeline import decode

    spec_code = {}
    exec(example("network-spec"), spec_code)
    monkeypatch.setattr(networks, "preview_spec", spec_code["preview_spec"], raising=False)  # as if in networks.py
    exporter_code, check_code = {}, {}
    exec(example("network-exporter"), exporter_code)
    exec(example("network-check"), check_code)
    monkeypatch.setitem(manifest_module._CROSS_CHECKS, "preview", check_code["_check_preview"])

    artifact = tmp_path / "art"
    shutil.copytree(tiny_artifact, artifact)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 3 * 64, 1), torch.nn.PixelShuffle(8), torch.nn.Tanh())
    exporter = exporter_code["PreviewExporter"](model, (4, 8, 8))
    section = export_network(exporter, artifact, ("fp32", "fp16"), 20, Steps(5, lambda m: None))
    assert section["graphs"]["fp16"]["validation"]["onnxruntime_vs_reference"]["max_rel_err"] <= 5e-3
    data = json.loads((artifact / "manifest.json").read_text())
    data["networks"]["preview"] = section
    (artifact / "manifest.json").write_text(json.dumps(data))

    manifest = runtime.load_manifest(artifact)
    spec = manifest.network("preview")
    assert (spec.input("latent").name, spec.output.name, spec.batch_unit) == ("latent", "image", "images")
    backend = runtime.create_backend(manifest, "onnxruntime", network="preview")
    latents = np.random.default_rng(0).standard_normal((3, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(latents)).numpy()
    images = decode(backend, latents)
    assert images.shape == (3, 3, 64, 64) and max_rel_err(images, expected) <= 1e-5

    data["networks"]["preview"]["inputs"][0]["shape"] = ["batch", 4, 16, 16]
    (artifact / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(runtime.ArtifactError, match="networks.preview.inputs"):
        runtime.load_manifest(artifact)
