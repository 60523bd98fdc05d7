import torch

from head_trainer.metrics import trajectory_metrics


def test_metrics_against_hand_computed_values():
    gt = torch.zeros(1, 64, 3)
    gt[0, :, 0] = torch.arange(1, 65, dtype=torch.float32)
    pred = gt[:, None].repeat(1, 3, 1, 1)
    pred[0, 0, :, 1] = 2.0  # sample 0: constant 2 m lateral offset
    pred[0, 1, :, 1] = 1.0  # sample 1: 1 m -> the best
    pred[0, 2, :32, 1] = 0.0  # sample 2: 0 for 3.2 s, then 3 m -> mean 1.5
    pred[0, 2, 32:, 1] = 3.0
    m = trajectory_metrics(pred, gt)
    assert m["ade"].item() == 2.0
    assert m["min_ade"].item() == 1.0
    assert m["fde"].item() == 2.0
    assert m["min_fde"].item() == 1.0  # min over samples at the last step (sample 1: 1 m, sample 2: 3 m)
    # by_t uses the sample chosen on the full horizon (sample 1), not the best over the first steps (sample 2)
    assert m["min_ade/by_t=3.0"].item() == 1.0
    assert m["ade/by_t=3.0"].item() == 2.0


def test_metrics_ignore_z_and_use_euclidean_xy():
    gt = torch.zeros(2, 64, 3)
    pred = torch.zeros(2, 1, 64, 3)
    pred[..., 0], pred[..., 1], pred[..., 2] = 3.0, 4.0, 100.0
    m = trajectory_metrics(pred, gt)
    assert torch.equal(m["ade"], torch.full((2,), 5.0, dtype=torch.float64))
