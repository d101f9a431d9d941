"""Speed patches: every place oloraplus reaches into a library's internals to train or evaluate faster.

Each one computes the same function as the plain PEFT + Trainer path (the tests compare them), and
each has a tripwire test that fails with a clear message when the internal it relies on changes.
"""
