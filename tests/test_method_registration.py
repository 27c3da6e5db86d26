"""Adding a method takes one module + one YAML: a method defined in this test file (class and schema side
by side) and a YAML in a folder on hydra.searchpath compose, train 2 steps, save, resume, and pass the
same contract checks as the built-in methods, with nothing in sslkit edited."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslkit.config import compose
from sslkit.errors import ConfigError
from sslkit.methods import METHODS, Method, create_backbone, embed, register_method
from sslkit.schemas import MethodConfig, positive
from tests import test_method_contract as contract


@dataclass
class MeanColourConfig(MethodConfig):
    name: str = "mean_colour"
    weight: float = positive(1.0)


class MeanColour(Method):
    """Predict each image's mean colour from the backbone's pooled features (a throwaway task)."""

    name = "mean_colour"
    config_class = MeanColourConfig
    export_note = "Backbone only."

    def __init__(self, cfg, model_cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, self.model_config = create_backbone(model_cfg)
        self.head = nn.Linear(self.backbone.num_features, 3)

    def forward(self, batch):
        images = batch["images"]  # (B, 3, H, W)
        loss = float(self.cfg.weight) * F.mse_loss(self.head(embed(self.backbone, images)), images.mean((2, 3)))
        return {"loss": loss, "mse": loss.detach()}


YAML = """# the throwaway method's one YAML
defaults:
  - mean_colour_schema
  - _self_
name: mean_colour
view:
  size: 64
  scale: [0.35, 1.0]
"""


@pytest.fixture
def mean_colour(tmp_path, monkeypatch):
    (tmp_path / "configs" / "method").mkdir(parents=True)
    (tmp_path / "configs" / "method" / "mean_colour.yaml").write_text(YAML)
    monkeypatch.setattr(MeanColour, "test_overrides",
                        (f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "method=mean_colour", "model=sslkit_pvt_test"))
    register_method(MeanColour)
    yield "mean_colour"
    del METHODS["mean_colour"]


def test_a_method_from_a_test_file_trains_saves_and_resumes(mean_colour, tmp_path):
    cfg = contract.tiny_cfg(mean_colour)
    assert cfg.method.name == "mean_colour" and cfg.method.weight == 1.0
    with pytest.raises(ConfigError, match=r"method.weight=-1.0: must be > 0"):  # its schema is checked like any
        contract.tiny_cfg(mean_colour, "method.weight=-1")
    contract.check_resume_equals_uninterrupted(mean_colour, tmp_path / "runs")  # compose -> 2 steps -> save -> resume


@pytest.mark.parametrize("check", contract.CHECKS, ids=lambda c: c.__name__)
def test_it_gets_the_contract_checks_for_free(mean_colour, check):
    check(mean_colour)


def test_registration_refuses_mismatches():
    @dataclass
    class Cfg(MethodConfig):
        name: str = "other"

    class Bad(Method):
        name = "bad"
        config_class = Cfg

    with pytest.raises(TypeError, match="defaults to 'other'"):
        register_method(Bad)
    with pytest.raises(TypeError, match="already registered"):
        type("UMMAE2", (METHODS["umae"],), {})  # a subclass is fine ...
        register_method(type("UMMAE2", (METHODS["umae"],), {}))  # ... registering it under the same name is not
    assert "bad" not in METHODS and "other" not in METHODS


def test_an_unknown_method_name_lists_the_registered_ones():
    from sslkit.methods import build_method

    cfg = compose([])
    cfg.method.name = "nope"
    with pytest.raises(ConfigError, match=r"registered methods: \['classify', 'dinov2'"):
        build_method(cfg)
