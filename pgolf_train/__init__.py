"""pgolf_train"""
