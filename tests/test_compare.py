"""head-compare tables and PNGs from constructed results; head-eval's skip / refuse rule."""

import json

import pytest

from head_trainer import head_compare
from head_trainer.head_eval import check_existing
from head_trainer.metrics import summarize


def _result(label: str, turn: float) -> dict:
    """Two samples: a sharp left (GT turns 1 rad) predicted with `turn` rad, and a straight one."""
    rows = []
    for key, kappa, gt_turn in (("a@1", 0.08, 1.0), ("b@1", 0.0, 0.0)):
        m = {"min_ade": 1.0 + turn, "ade": 2.0, "fde": 3.0, "min_fde": 2.5, "corner_distance": 1.5,
             "max_lat_dev": 5.0 * turn, "gt_max_lat_dev": 5.0 * gt_turn, "lat_err@6.4": -1.0,
             "heading_change_pred": turn if gt_turn else 0.0, "heading_change_gt": gt_turn,
             "heading_err": (turn - gt_turn) if gt_turn else 0.0, "min_ade/by_t=3.0": 0.5}
        gt = [[0.5 * i, 0.02 * kappa * i * i] for i in range(64)]
        rows.append({"key": key, "clip_id": key[0], "t0_us": 1, "camera_config": "front-only",
                     "curvature": {"future_signed_peak_kappa": kappa}, "bin": "sharp-left" if kappa else "straight",
                     "metrics": m, "gt_xy": gt, "pred_xy": [gt, gt]})
    by_bin = summarize([{**r["metrics"], "bin": r["bin"]} for r in rows])
    return {"label": label, "by_bin": by_bin, "summary": by_bin["all"], "per_sample": rows,
            "metadata": {"cache": {"url": "/nonexistent"}}}


def test_tables_show_bins_and_bias(tmp_path):
    md = head_compare.tables([_result("base", 0.1), _result("ft", 0.9)], ["base", "ft"])
    lines = md.splitlines()
    assert lines[0].startswith("| run | cameras | n | minADE")
    assert lines[2].startswith("| base | front-only | 2 | 1.10 |") and lines[2].endswith("| 0.10 | 0.10 |")
    assert lines[3].endswith("| 0.90 | 0.90 |")
    sharp = next(ln for ln in lines if ln.startswith("| sharp |"))
    assert sharp == "| sharp | 1 | 1.10 / 0.5 (5.0) / 0.10 | 1.90 / 4.5 (5.0) / 0.90 |"
    straight = next(ln for ln in lines if ln.startswith("| straight |"))
    assert straight.endswith("/ - |")  # straight samples have no bias score


def test_compare_cli_writes_markdown_and_pngs(tmp_path, capsys):
    paths = []
    for lab, turn in (("base", 0.1), ("ft", 0.9)):
        p = tmp_path / f"{lab}.json"
        p.write_text(json.dumps(_result(lab, turn)))
        paths.append(str(p))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    out = tmp_path / "cmp"
    assert head_compare.main(["--out", str(out), "--results", *paths, "--runs", f"ft={run}"]) == 0
    assert "| sharp | 1 |" in capsys.readouterr().out
    assert (out / "compare.md").read_text().startswith("# head-compare")
    for name in ("samples.png", "bins.png", "loss.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,msg", [
    (["--cache", "nonsense"], "expected NAME=PATH"),
    (["--cache", "a=x", "--head", "ft=h.safetensors"], "expected LABEL=HEAD_FILE@NAME"),
    (["--cache", "a=x", "--head", "ft=h.safetensors@a"], "no such head file"),
    (["--results", "missing.json"], "no such file"),
    ([], "nothing to compare"),
])
def test_compare_cli_errors(tmp_path, capsys, argv, msg):
    assert head_compare.main(["--out", str(tmp_path / "o"), *argv]) == 2
    assert msg in capsys.readouterr().err


def test_existing_result_is_skipped_only_when_it_is_the_same_evaluation(tmp_path):
    meta = {"format": "v2", "head": None, "parameters": {"seed": 0}}
    out = tmp_path / "r.json"
    assert check_existing(out, meta, force=False) is None  # nothing there yet
    out.write_text(json.dumps({"metadata": {**meta, "run": {"timestamp": "then"}}, "summary": {}}))
    assert check_existing(out, meta, force=False)["summary"] == {}  # same evaluation, other time: skip
    other = {**meta, "parameters": {"seed": 1}}
    with pytest.raises(FileExistsError, match="differs in parameters.*--force"):
        check_existing(out, other, force=False)
    assert check_existing(out, other, force=True) is None
