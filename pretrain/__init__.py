"""dinoforge.pretrain"""
