"""pgolf_eval"""
