"""`viscpm demo chat|paint`: gradio apps in the manner of the original's demo_chat.py and demo_paint.py.

Chat: upload an image, ask questions in turns, the answer streams in; the image's features are computed once per
image and reused for later turns, as `VisCPMChatForConditionalGeneration.chat` allows; "Clear" starts over. Paint:
prompt, negative prompt, steps, seed, and a gallery. Each app holds one model; gradio's queue runs one request at a
time on it.
"""

from __future__ import annotations

from pathlib import Path

from .server import StreamedCall


def chat_app(model_dir: Path):
    import gradio as gr
    import torch
    from transformers import AutoModel, AutoProcessor

    import viscpm  # noqa: F401  (registers the Auto classes)

    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)

    def respond(image, question, history, state):
        """Streams the answer into the chat; `state` keeps the context and the image's features across turns."""
        question = (question or "").strip()
        if image is None:
            raise gr.Error("Upload an image first: VisCPM-Chat answers questions about an image.")
        if not question:
            raise gr.Error("Type a question.")
        if state.get("image") is not image:  # a new image: a new conversation
            state = {"image": image, "context": "", "vision": None}
            history = []
        history = [*history, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        call = StreamedCall.in_thread(
            processor.tokenizer,
            lambda streamer: model.chat(
                None if state["vision"] is not None else image,
                question,
                processor,
                context=state["context"],
                vision_hidden_states=state["vision"],
                num_beams=1,
                streamer=streamer,
            ),
        )
        try:
            for text in call:
                history[-1]["content"] += text
                yield "", history, state
        except Exception as error:  # noqa: BLE001  (shown to the user)
            raise gr.Error(str(error)) from error
        answer, state["context"], state["vision"] = call.result
        history[-1]["content"] = answer
        yield "", history, state

    with gr.Blocks(title="VisCPM-Chat") as app:
        gr.Markdown(f"## VisCPM-Chat\n`{model_dir}`")
        with gr.Row():
            image = gr.Image(type="pil", label="Image", elem_id="image")
            chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)
        question = gr.Textbox(label="Question", placeholder="Ask about the image", elem_id="question")
        with gr.Row():
            send = gr.Button("Send", variant="primary", elem_id="send")
            clear = gr.Button("Clear", elem_id="clear")
        state = gr.State({})
        send.click(respond, [image, question, chatbot, state], [question, chatbot, state])
        question.submit(respond, [image, question, chatbot, state], [question, chatbot, state])
        clear.click(lambda: (None, [], {}, ""), None, [image, chatbot, state, question])
    return app


def paint_app(model_dir: Path):
    import gradio as gr
    import torch

    from ..modeling.pipeline_viscpm_paint import VisCPMPaintPipeline

    pipeline = VisCPMPaintPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)

    def paint(prompt, negative_prompt, steps, seed, count):
        if not (prompt or "").strip():
            raise gr.Error("Say what to draw.")
        generator = torch.Generator().manual_seed(int(seed))
        return pipeline(
            prompt,
            negative_prompt=negative_prompt or None,
            num_inference_steps=int(steps),
            num_images_per_prompt=int(count),
            generator=generator,
        ).images

    with gr.Blocks(title="VisCPM-Paint") as app:
        gr.Markdown(f"## VisCPM-Paint\n`{model_dir}`")
        prompt = gr.Textbox(label="Prompt", elem_id="prompt")
        negative = gr.Textbox(label="Negative prompt", elem_id="negative")
        with gr.Row():
            steps = gr.Slider(1, 100, value=50, step=1, label="Steps", elem_id="steps")
            seed = gr.Number(value=0, precision=0, label="Seed", elem_id="seed")
            count = gr.Slider(1, 4, value=1, step=1, label="Images", elem_id="count")
        run = gr.Button("Generate", variant="primary", elem_id="generate")
        gallery = gr.Gallery(label="Images", elem_id="gallery", columns=4)
        run.click(paint, [prompt, negative, steps, seed, count], gallery)
    return app
