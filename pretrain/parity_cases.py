"""Parity handlers for the pretraining fixtures (losses, masking, schedules, parameter groups, train step).

Registered under the ``dinoforge.parity_cases`` entry point; ``dinoforge parity DIR`` runs them on every
``*.pt`` file of a directory in the official fixture format (files are recognised by their keys).
"""

from __future__ import annotations

from dinoforge.pretrain.parity.loss_cases import DinoLossHandler, IbotLossHandler, KoleoHandler
from dinoforge.pretrain.parity.masking_case import MaskingHandler
from dinoforge.pretrain.parity.optim_cases import ParamGroupsHandler, SchedulesHandler
from dinoforge.pretrain.parity.train_step_case import TrainStepHandler

HANDLERS: list = [KoleoHandler(), DinoLossHandler(), IbotLossHandler(), MaskingHandler(), SchedulesHandler(),
                  ParamGroupsHandler(), TrainStepHandler()]
