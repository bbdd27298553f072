"""A seconds-long training config for end-to-end tests (usable with --config=tests/micro_config.py)."""

from configs.qwen_moe import get_config as get_base_config


def get_config(arg: str = ""):
    del arg
    cfg = get_base_config("tiny")
    cfg.workdir = "/tmp/gspo_micro"
    cfg.steps = 2
    cfg.rollout.prompts_per_step = 4
    cfg.rollout.group_size = 4
    cfg.algo.minibatches = 2
    cfg.data.train_size = 64
    cfg.data.eval_size = 8
    cfg.eval.batch_size = 8
    cfg.eval.every = 2
    cfg.warmstart.steps = 2
    cfg.warmstart.batch_size = 8
    cfg.warmstart.eval_every = 2
    cfg.checkpoint.every = 1
    cfg.checkpoint.async_save = False
    cfg.log.samples_every = 1
    cfg.mesh.num_devices = 1
    return cfg


def override(cfg, **overrides):
    """Sets dotted keys: override(cfg, **{"mesh.data": 2})."""
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg
