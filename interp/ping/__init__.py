"""PING (Prefix INjection Guard), knowing nothing about any particular model.

- :mod:`interp.ping.loop`: the paper's loop (rounds, tau, top-k feedback, resumable history);
- :mod:`interp.ping.generators`: a fixed list, a local chat model, an OpenAI-compatible endpoint;
- :mod:`interp.ping.search`: an offline phrase search over a lexicon;
- :mod:`interp.ping.scoring`: a prefix's benign success and harmful refusal on a task set;
- :mod:`interp.ping.screen`: probe-guided screening (one forward per task, no generation);
- :mod:`interp.ping.baselines`: the defences PING is compared with;
- :mod:`interp.ping.subject`: what a built-in model pair provides to the study;
- ``python -m interp.ping`` (:mod:`interp.ping.__main__`): the whole study, ``run(config)``.
"""

from interp.ping.baselines import I_CANT, SAFETY_SYSTEM_PROMPT, Condition, conditions, few_shot_transform
from interp.ping.generators import (ChatGenerator, GeneratorError, HFChatGenerator, OpenAIChatGenerator,
                                    StaticGenerator, meta_prompt, parse_prefixes)
from interp.ping.loop import (Evaluation, Feedback, PingError, PingResult, PrefixGenerator, PrefixScore, Request,
                              ScoreFn, Screen, generations_to_reach, load_history, prefix_key, run_ping)
from interp.ping.scoring import Scorer
from interp.ping.screen import ProbeScreen, fit_refusal_probe, harm_direction, harm_direction_screen
from interp.ping.search import Lexicon, PhraseSearchGenerator
from interp.ping.subject import Subject, make_subject, register_subject, subject_names

__all__ = [
    "I_CANT", "SAFETY_SYSTEM_PROMPT", "ChatGenerator", "Condition", "Evaluation", "Feedback", "GeneratorError",
    "HFChatGenerator", "Lexicon", "OpenAIChatGenerator", "PhraseSearchGenerator", "PingError", "PingResult",
    "PrefixGenerator", "PrefixScore", "ProbeScreen", "Request", "ScoreFn", "Scorer", "Screen", "StaticGenerator", "Subject",
    "conditions", "few_shot_transform", "fit_refusal_probe", "generations_to_reach", "harm_direction",
    "harm_direction_screen", "load_history", "make_subject", "meta_prompt", "parse_prefixes", "prefix_key",
    "register_subject", "run_ping", "subject_names",
]
