"""The command-line programs: ``python -m mdeq.cli.<program>`` from an installed package, or
``python tools/<program>.py`` from a checkout (those files call these).

Hydra apps for training (``train_cls``, ``train_seg``, ``finetune``; configs in ``mdeq/configs/``) and argparse
tools whose flags read better (``eval_cls``, ``eval_seg``, ``distill``, ``publish_weights``,
``convert_official``, ``benchmark``). Each parses its input and calls the engine.
"""
