"""Training and evaluation shared by the tools; knows the tasks, the data and the models.

Rooms:

* the run: ``app`` (Hydra glue: config groups whose defaults live in the code, the tools' bodies),
  ``training_loop`` (``Trainer``, task-independent), ``classification_trainer`` and ``segmentation_trainer``
  (the tasks), ``deq_schedule`` (unrolled pre-training, DEQ mode, the Jacobian penalty's schedule),
  ``deq_loss`` (the DEQ terms of a loss), ``run_state`` (what a checkpoint holds, resume), ``precise_bn``,
  ``train_stats`` (logged running means), ``amp``, ``distributed`` (torchrun / DDP), ``run_logger``;
* files: ``weight_files`` (the one safe reader of weights and checkpoint files; what a file that is not one is),
  ``checkpoint`` (atomic save, safe load), ``legacy`` (old setting names and checkpoint formats),
  ``rebuild`` (the one function from a checkpoint to its model), ``model_source`` (a model from a checkpoint,
  weights file or tag), ``weights`` (reading weights, partial loads, freezing), ``seg_model`` (the segmentation
  model of a run);
* evaluation: ``evaluate`` (classification metrics and solver sweeps), ``classification_eval`` and
  ``segmentation_eval`` (the evaluation tools' jobs), ``seg_inference``, ``seg_metrics``, ``seg_loss``;
* ``distill`` (C-DEQ distillation of a trained classifier).
"""
