"""`mode=reference` against numbers produced by the released DKEL code itself.

The numbers below were printed once by the released code (GitHub shaoeric/Decoupled-Knowledge-
with-Ensemble-Learning-for-Online-Distillation, commit 656c460), run unmodified outside this
project: its `LossWrapper` (CrossEntropyLoss, KDLoss, PMLoss, exp=beta) on the fixed float64
logits of `fixed_logits`, and its own training pieces (`ResNet(BasicBlock, [1, 1, 1])` loaded
with the initial weights of dkel's resnet8 student, `Trainer.init_mean_model` with init=1,
`Controller.train_step` with its SGD config, `update_ema_variables` with alpha 0.999) on the
batches of `step_batches`.  Only the numbers are kept here, none of its code."""
import numpy as np
import pytest
import torch

from conftest import make_config
from dkel import losses as L
from dkel import runtime
from dkel.config import TimeScale
from dkel.engine import Stepper
from dkel.methods import METHODS, Setup

# LossWrapper total per beta and epoch
RELEASED_LOSS = {
    0.01: {0: 15.581843172714, 1: 15.568927558613, 2: 15.568927558613, 9: 15.568927558613, 10: 15.568927558613,
           45: 15.568927558613, 80: 15.568927558613, 81: 17.609855979057, 82: 17.610845338749, 85: 17.613754742899,
           92: 17.620213344473, 93: 17.621099646657, 150: 17.659415004937, 299: 17.698047566597},
    0.05: {0: 15.581843172714, 1: 15.568927558613, 2: 15.568927558613, 9: 15.568927558613, 10: 15.568927558613,
           45: 15.568927558613, 80: 15.568927558613, 81: 17.705393328757, 82: 17.705583247416, 85: 17.706099213645,
           92: 17.707040738568, 93: 17.709287452555, 150: 17.709287452555, 299: 17.709287452555},
    0.5: {0: 15.581843172714, 1: 15.568927558613, 2: 15.568927558613, 9: 15.568927558613, 10: 15.568927558613,
          45: 15.568927558613, 80: 15.568927558613, 81: 17.709287452555, 82: 17.709287452555, 85: 17.709287452555,
          92: 17.709287452555, 93: 17.709287452555, 150: 17.709287452555, 299: 17.709287452555},
}

# the released training loop: loss of each of 6 steps (epochs below), then in eval mode on the probe
# images the first two rows of each teacher peer's logits and of the student's ensemble head
STEP_EPOCHS = [0, 0, 1, 81, 81, 200]
STEP_LOSSES = [9.2257999682, 10.1527948855, 8.3575424847, 11.6700636777, 12.3036727642, 9.9645747731]
TEACHER = [[[-0.863670788, 0.306584402, -0.473922326, 0.06836538, -0.194319752, -1.478925481, 0.37798041, -0.419419253,
             0.725188225, -0.784140304],
            [-0.700665176, 0.060422408, -0.372452166, 0.056999035, -0.264377784, -1.108400324, 0.256000651, -0.647750803,
             0.331217152, -0.595832812]],
           [[-0.412254177, 0.280133293, -0.203080781, 0.004114542, 0.287151268, -1.409839446, 0.507620364, -0.651085725,
             0.387152421, -0.254234234],
            [-0.344403845, 0.376114498, -0.214559101, 0.080178062, 0.314291881, -0.805429399, 0.389133585, -0.361575788,
             0.184884538, -0.331950475]],
           [[-0.685193164, 0.110462037, -0.140321418, 0.421942195, 0.433783544, -1.010493847, 0.436830221, -0.516875598,
             0.738098807, -0.181427958],
            [-0.488993708, 0.175670508, -0.27940124, 0.476432177, 0.30765759, -0.830377995, 0.339400832, -0.404415033,
             0.446448672, -0.148775675]]]
ENSEMBLE = [[-1.572507303, -0.525346027, 10.026399752, -1.882603016, 1.000532249, -1.974247626, -1.340123768,
             -2.719504774, -2.433053386, -0.122923159],
            [-1.367910572, -0.418594079, 8.399992878, -1.720521742, 0.735139418, -1.562824697, -1.06954179,
             -2.133814904, -2.306825983, -0.052733327]]


def fixed_logits():
    rng = np.random.default_rng(2023)
    z = rng.normal(size=(3, 8, 10)) * 2
    z_e = rng.normal(size=(8, 10)) * 2
    t = rng.normal(size=(3, 8, 10)) * 2
    y = rng.integers(0, 10, size=8)
    return torch.tensor(z), torch.tensor(z_e), torch.tensor(t), torch.tensor(y)


@pytest.mark.parametrize("beta", sorted(RELEASED_LOSS))
def test_reference_loss_equals_the_released_loss_wrapper(beta):
    """beta = 0.01 and 0.05 keep the ensemble weight above its 0.01 cut-off after epoch 80, where
    the released ramp is 0.1: the only epochs at which its decaying ensemble acts."""
    z, z_e, t, y = fixed_logits()
    for epoch, expected in RELEASED_LOSS[beta].items():
        got = L.dkel_loss(z, z_e, t, y, epoch, mode="reference", beta=beta)["loss"].item()
        assert got == pytest.approx(expected, rel=1e-11), (beta, epoch)


def step_batches():
    """(initialisation batches, training batches, probe images) as [K, B, C, H, W] views."""
    g = torch.Generator().manual_seed(7)
    draw = lambda: (torch.randn(8, 3, 3, 16, 16, generator=g).double(), torch.randint(0, 10, (8,), generator=g))
    init = [draw() for _ in range(3)]
    train = [draw() for _ in range(6)]
    probe = torch.randn(4, 3, 16, 16, generator=g).double()
    as_views = lambda batches: [(x.transpose(0, 1).contiguous(), y) for x, y in batches]
    return as_views(init), as_views(train), probe


def test_reference_mode_trains_like_the_released_code_over_steps():
    """Initialisation (k + 1 steps at lr/100), the EMA warm-up and the loss, step by step."""
    cfg = make_config(method="dkel", mode="reference", init_steps=1, time_scale=1, epochs=300,
                      schedule="multistep", milestones=[1000], device="cpu", precision="fp32")
    torch.manual_seed(0)
    method = METHODS.get("dkel")(cfg, Setup("resnet8", 10, 3, 3, 300, 10, TimeScale())).double()
    init, train, probe = step_batches()
    method.prepare(iter(init))
    stepper = Stepper(cfg, method, runtime.setup("cpu", "fp32", False))
    method.train()
    losses = [stepper(views, labels, epoch).losses["loss"].item()
              for (views, labels), epoch in zip(train, STEP_EPOCHS)]
    assert losses == pytest.approx(STEP_LOSSES, rel=1e-9)
    method.eval()
    with torch.no_grad():
        teacher = method.teacher(probe).logits[:, :2]
        ensemble = method.student(probe).ensemble[:2]
    torch.testing.assert_close(teacher, torch.tensor(TEACHER, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(ensemble, torch.tensor(ENSEMBLE, dtype=torch.float64), rtol=0, atol=1e-8)
