"""One LightningDataModule per dataset family; ``DATAMODULES`` maps a name to its class."""

import warnings

from data_modules.base import AnomalyDataModule, DataError, Record
from data_modules.bmad import BMAD, RESC, BrainMRI, LiverCT
from data_modules.folder import Folder
from data_modules.mvtec_3d import MVTec3D
from data_modules.mvtec_ad import MVTecAD
from data_modules.mvtec_loco import MVTecLOCO
from data_modules.ped2 import Ped2
from data_modules.synthetic import SyntheticDataModule
from data_modules.unified import Unified
from data_modules.visa import VisA

DATAMODULES: dict[str, type[AnomalyDataModule]] = {
    "synthetic": SyntheticDataModule,
    "mvtec_ad": MVTecAD,
    "visa": VisA,
    "mvtec_loco": MVTecLOCO,
    "brainmri": BrainMRI,
    "liverct": LiverCT,
    "resc": RESC,
    "mvtec_3d": MVTec3D,
    "ped2": Ped2,
    "folder": Folder,
    "unified": Unified,
}



def canonical_name(name: str) -> str:
    """The dataset name as amoe spells it; ``livercT`` (the spelling before amoe 0.2) still works, with a warning."""
    if name == "livercT":
        warnings.warn("the dataset name 'livercT' is deprecated; use 'liverct'.", FutureWarning, stacklevel=2)
        return "liverct"
    return name


__all__ = [
    "BMAD", "DATAMODULES", "RESC", "AnomalyDataModule", "BrainMRI", "DataError", "Folder", "LiverCT", "MVTec3D",
    "MVTecAD", "MVTecLOCO", "Ped2", "Record", "SyntheticDataModule", "Unified", "VisA", "canonical_name",
]
