"""The model: the network (net), its loss, lr schedules and the LightningModule (module)."""

from snvbert.model.loss import focal_loss
from snvbert.model.net import SIZES, NetConfig, SNVBertNet, build_net

__all__ = ["SIZES", "NetConfig", "SNVBertNet", "build_net", "focal_loss"]
