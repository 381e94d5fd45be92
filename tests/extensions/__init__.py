"""Extensions a user writes in a module of their own (a head, a teacher format): each file here is the whole of one,
with no edit to kd_plugin, loaded by tests/test_extensions.py."""
