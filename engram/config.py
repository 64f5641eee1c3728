"""Every config class under one import, for users and for code written before the configs moved next to
what they configure. Inside the package, import each from its home:

    engram.schema               Serialisable, apply_overrides (--set), the validation helpers
    engram.model.table_config   TableConfig, EngramConfig, OverEncodingConfig, TABLE_INIT_STD, TABLE_INIT_REFERENCE
    engram.model.config         MoEConfig, YarnConfig, MLAConfig, BackboneConfig, ModelConfig
    engram.data.config          DataConfig
    engram.train.config         TrainConfig (and its sections), RunConfig, OPTIMIZERS, PARALLEL
    engram.compat.deepseek      DEMO_MODULE
    engram.presets              PRESETS, RUN_PRESETS, get_preset, get_run_preset

Nothing in the library imports this module, so it can name them all without an import cycle.
"""

from engram.compat.deepseek import DEMO_MODULE
from engram.data.config import DataConfig
from engram.model.config import BackboneConfig, MLAConfig, ModelConfig, MoEConfig, YarnConfig
from engram.model.table_config import (GATES, TABLE_INIT_REFERENCE, TABLE_INIT_STD, VARIANTS, EngramConfig,
                                       OverEncodingConfig, TableConfig)
from engram.presets import PRESETS, RUN_PRESETS, get_preset, get_run_preset
from engram.schema import DERIVED, Serialisable, apply_overrides, derived
from engram.train.config import (OPTIMIZERS, PARALLEL, CheckpointConfig, EvalConfig, OptimConfig, PlacementConfig,
                                 RunConfig, ScheduleConfig, TrainConfig)

_Serialisable = Serialisable  # its name before engram.schema

__all__ = ["DEMO_MODULE", "DERIVED", "GATES", "OPTIMIZERS", "PARALLEL", "PRESETS", "RUN_PRESETS", "TABLE_INIT_REFERENCE",
           "TABLE_INIT_STD", "VARIANTS", "BackboneConfig", "CheckpointConfig", "DataConfig", "EngramConfig",
           "EvalConfig", "MLAConfig", "ModelConfig", "MoEConfig", "OptimConfig", "OverEncodingConfig",
           "PlacementConfig", "RunConfig", "ScheduleConfig", "Serialisable", "TableConfig", "TrainConfig",
           "YarnConfig", "apply_overrides", "derived", "get_preset", "get_run_preset"]
