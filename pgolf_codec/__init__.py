"""pgolf_codec"""
