"""Released MAE weights by name, cached, verified and usable offline.

    resolved = resolve_weights("official:mae_pretrain_vit_base")  # or "hf:facebook/vit-mae-base", "timm:..."
    checkpoint = mae.interop.read_checkpoint(resolved.path)
    config_yaml["init"] = resolved.provenance()  # name, source, checksum, licence

`CATALOGUE` lists every known name (`mae weights` prints it); `docs/weights.md` describes the cache and the settings
(``MAE_HOME``, ``MAE_WEIGHTS_MIRROR``, ``MAE_OFFLINE``, ``MAE_DOWNLOAD_TIMEOUT``, ``HF_ENDPOINT``, ``HF_HOME``).
"""

from mae.weights.catalogue import CATALOGUE, WeightsEntry, is_weights_name
from mae.weights.resolve import ResolvedWeights, resolve_weights
from mae.weights.settings import cache_home

__all__ = ["CATALOGUE", "ResolvedWeights", "WeightsEntry", "cache_home", "is_weights_name", "resolve_weights"]
