"""Tuning plans (what each block, the embeddings, pooler and head train) and the strategies that build them
from layer scores."""
from fastsel.plans.plan import *  # noqa: F401,F403
from fastsel.plans.strategies import *  # noqa: F401,F403
from fastsel.plans.request import *  # noqa: F401,F403
