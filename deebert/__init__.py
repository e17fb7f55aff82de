"""deebert: BERT with an off-ramp after every layer, trained in two loops, exiting early at inference.

Xin, Tang, Lee, Yu, Lin. DeeBERT: Dynamic Early Exiting for Accelerating BERT Inference. ACL 2020.
"""
