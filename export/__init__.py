"""dinoforge.export"""
