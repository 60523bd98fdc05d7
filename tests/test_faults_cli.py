"""Bad command lines for every verb: exit code 2 and one `prog: error:` line naming the bad value, never
a traceback. Generated: a non-number for every int / float flag of each verb's config; then the values
each verb must refuse by meaning (a device that does not exist, a file that is not a head, ...)."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cache_builder import cache_build, cache_inspect
from head_trainer import head_eval, head_export, head_train
from shared.store import KVSpec, StoreWriter, default_store_url, synthetic_sample

ROOT = Path(__file__).resolve().parents[1]
VERBS = {
    "cache-build": (cache_build.main, cache_build.BuildConfig, ["--dataset", "/nonexistent/ds", "--checkpoint", "/nonexistent/ck"]),
    "head-train": (head_train.main, head_train.TrainConfig, ["--cache", "/nonexistent/store", "--out", "/nonexistent/run"]),
    "head-eval": (head_eval.main, head_eval.EvalConfig, ["--cache", "/nonexistent/store", "--out", "/nonexistent/r.json"]),
    "head-export": (head_export.main, head_export.ExportConfig, ["--head", "/nonexistent/h", "--out", "/nonexistent/o"]),
}
NOISE = re.compile(r"^(W\d{4} |Failed to load .*torchao|.*Warning|  warnings\.warn)")


def _run(main, argv, capsys) -> tuple[int, list[str]]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [ln for ln in err.splitlines() if ln.strip() and not NOISE.match(ln)]


def _assert_one_line(prog, rc, lines, bad):
    assert rc == 2, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith(prog) and ": error: " in lines[0], lines
    assert bad in lines[0], (bad, lines[0])


def _numeric_cases():
    for prog, (_main, cls, req) in VERBS.items():
        for f in dataclasses.fields(cls):
            typ = str(f.type)
            if typ.startswith(("int", "float")):
                flag = "--" + f.name.replace("_", "-")
                yield pytest.param(prog, [*req, flag, "x1.5e"], "x1.5e", id=f"{prog}{flag}=x1.5e")


@pytest.mark.parametrize("prog,argv,bad", list(_numeric_cases()))
def test_every_numeric_flag_refuses_a_non_number(prog, argv, bad, capsys):
    rc, lines = _run(VERBS[prog][0], argv, capsys)
    _assert_one_line(prog, rc, lines, bad)


SEMANTIC = [
    ("cache-build", ["--device", "tpu"], "tpu"),
    ("cache-build", ["--device", "cuda:7"], "cuda:7"),
    ("cache-build", ["--mode", "dream"], "dream"),
    ("cache-build", ["--quant", "int3"], "int3"),
    ("cache-build", ["--codec", "lzma"], "lzma"),
    ("cache-build", ["--kv-dtype", "float16"], "float16"),
    ("cache-build", ["--shard", "2/2"], "2/2"),
    ("cache-build", ["--batch-size", "0"], "--batch-size 0"),
    ("cache-build", ["--workers", "-1"], "--workers -1"),
    ("cache-build", ["--max-samples", "-3"], "--max-samples -3"),
    ("cache-build", ["--max-new-tokens", "0"], "--max-new-tokens 0"),
    ("cache-build", ["--attn", "magic"], "magic"),
    ("cache-build", ["--cameras", "fisheye"], "fisheye"),
    ("cache-build", ["--keyframes", "stride:x"], "stride:x"),
    ("cache-build", ["--resume", "--overwrite"], "--overwrite"),
    ("cache-build", ["--bogus-flag", "1"], "--bogus-flag"),
    ("cache-build", [], "/nonexistent/ds"),
    ("head-train", ["--device", "tpu"], "tpu"),
    ("head-train", ["--steps", "-1"], "--steps -1"),
    ("head-train", ["--batch-size", "0"], "--batch-size 0"),
    ("head-train", ["--lr", "-1"], "--lr -1"),
    ("head-train", ["--dtype", "fp8"], "fp8"),
    ("head-train", ["--num-workers", "-2"], "-2"),
    ("head-train", [], "/nonexistent/store"),
    ("head-eval", ["--device", "tpu"], "tpu"),
    ("head-eval", ["--num-samples", "0"], "--num-samples 0"),
    ("head-eval", ["--dtype", "fp8"], "fp8"),
    ("head-eval", ["--head", "README.md"], "README.md"),
    ("head-eval", [], "/nonexistent/store"),
    ("head-export", ["--head", "README.md"], "README.md"),
    ("head-export", [], "/nonexistent/h"),
]


def _semantic_cases():
    for prog, extra, bad in SEMANTIC:
        req = list(VERBS[prog][2])
        if prog == "head-export" and "--head" in extra:
            req = req[2:]
        yield pytest.param(prog, [*req, *extra], bad, id=f"{prog} {' '.join(extra) or 'missing inputs'}")


@pytest.mark.parametrize("prog,argv,bad", list(_semantic_cases()))
def test_bad_values_are_refused_by_name(prog, argv, bad, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # README.md as a relative path
    rc, lines = _run(VERBS[prog][0], argv, capsys)
    _assert_one_line(prog, rc, lines, bad)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("cli") / "s")
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, hidden_size=16, thumb_hw=(6, 10))
    with StoreWriter.create(url, dict(checkpoint="c", head_config_hash="h", processor="p", prefix_mode="teacher",
                                      dataset_revision="r", code_version="t"), spec) as w:
        for i in range(4):
            w.write(synthetic_sample(i, spec))
    return url


def _inspect_cases():
    yield ["summary", "/nonexistent/store"], "/nonexistent/store"
    yield ["summary", "{store}", "--storage-options", "{{nope"], "--storage-options"
    yield ["summary", "{store}", "--storage-options", "[1]"], "--storage-options"
    yield ["ls", "{store}", "--limit", "-1"], "--limit"
    yield ["ls", "{store}", "--limit", "many"], "many"
    yield ["ls", "{store}", "--min-curvature", "0.1", "--curvature-stat", "wiggle"], "wiggle"
    yield ["show", "{store}", "clip-00001@5200000"], "clip-00001@5200000"
    yield ["show", "{store}", "99"], "99"
    yield ["probe", "{store}", "--feature", "magic"], "magic"
    yield ["probe", "{store}", "--alpha", "0"], "--alpha"
    yield ["frobnicate", "{store}"], "frobnicate"
    yield ["verify"], "store"


@pytest.mark.parametrize("argv,bad", list(_inspect_cases()), ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_cache_inspect_refuses_by_name(argv, bad, store, capsys):
    rc, lines = _run(cache_inspect.main, [a.format(store=store) for a in argv], capsys)
    _assert_one_line("cache-inspect", rc, lines, bad)


def test_a_key_without_its_camera_suffix_suggests_the_full_key(store, capsys):
    rc, lines = _run(cache_inspect.main, ["show", store, "clip-00001@5200000"], capsys)
    assert rc == 2 and "clip-00001@5200000:front-only" in lines[0]


def test_cache_inspect_into_a_closed_pipe_is_quiet(store):
    """`cache-inspect summary STORE | head -0`: the reader is gone before the first write."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in (["summary", store], ["ls", store]):
        p = subprocess.Popen([sys.executable, "-m", "cache_builder.cache_inspect", *cmd], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p.stdout.close()
        err = p.stderr.read().decode()
        assert p.wait() == 0 and "BrokenPipe" not in err and "Traceback" not in err, err


def test_help_shows_each_default_once(capsys):
    for prog, (main, _, _) in VERBS.items():
        with pytest.raises(SystemExit):
            main(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert not re.search(r"\(default: [^)]*\) \(default:", out), prog
        assert "(default: None)" not in out, prog
    with pytest.raises(SystemExit):
        cache_inspect.main(["show", "--help"])
    assert "clip_id@t0_us:camera_config" in capsys.readouterr().out


def test_store_names_with_a_slash_resolve_under_cache(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert default_store_url("demo/store") == "cache/demo/store"
    (tmp_path / "demo" / "store").mkdir(parents=True)
    (tmp_path / "demo" / "store" / "zarr.json").write_text("{}")
    assert default_store_url("demo/store") == "demo/store"  # an existing store at that path wins
    assert default_store_url("run1") == "cache/run1" and default_store_url("./x") == "./x"
    assert default_store_url("s3://b/x") == "s3://b/x" and default_store_url("/abs/x") == "/abs/x"


def test_cache_build_dry_run_reports_the_estimate(tmp_path, tiny_checkpoint, capsys):
    from shared.data import write_synthetic_world

    world = tmp_path / "w"
    write_synthetic_world(world, n_clips=2, seed=1, width=160, height=96, duration_s=12.0, kinds=["straight", "sharp-left"])
    rc = cache_build.main(["--dataset", str(world), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "s"),
                           "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and '"estimated_total_stored_bytes_one_keyframe_per_clip"' in out
    assert not (tmp_path / "s").exists()  # a dry run writes nothing
