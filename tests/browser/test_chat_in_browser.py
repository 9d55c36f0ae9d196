"""The chat notebook (08b) as a learner meets it: Run All in JupyterLab, then type and click in a real browser.

After Run All the chat must be live: a message typed into Alice's window and sent with her button shows up in
Bob's window. The "Stop the chat" button at the end stops everything (both status lines say so, the demo's
temp folder is gone), and a send after that says the chat is stopped instead of doing nothing visible.
"""
from __future__ import annotations

import uuid
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "08b_ui.ipynb"
WAIT_MS = 60_000  # generous: a poll round trip through the mesh, on a busy machine


def test_a_message_typed_in_alices_window_shows_in_bobs_and_stop_ends_the_chat(lab, lab_server, lab_folder):
    from playwright.sync_api import expect

    path = lab.run_a_copy(NOTEBOOK, lab_folder)
    assert len(list(lab_server.tmp.glob("bubble-chat-*"))) == 1, "the live chat keeps its folder until stopped"

    # The windows shown last, in "Your turn", are the ones next to the learner after Run All.
    alice = lab.page.locator(".bubble-chat", has_text="Alice's laptop").last
    bob = lab.page.locator(".bubble-chat", has_text="Bob's phone").last
    message = f"typed in a real browser, {uuid.uuid4().hex[:8]}"
    alice.locator(".bubble-text input").fill(message)
    alice.locator("button.bubble-send").click()
    expect(alice.locator(".bubble-text input")).to_have_value("", timeout=WAIT_MS)  # sent, box cleared
    expect(alice.locator(".bubble-transcript")).to_contain_text(message, timeout=WAIT_MS)
    expect(bob.locator(".bubble-transcript")).to_contain_text(message, timeout=WAIT_MS)  # fetched by Bob's poller

    stop = lab.page.locator("button.bubble-stop-chat")
    expect(stop).to_have_text("Stop the chat")
    stop.click()
    for window in (alice, bob):
        expect(window.locator(".bubble-status")).to_have_text("chat stopped", timeout=WAIT_MS)
    expect(stop).to_be_disabled(timeout=WAIT_MS)  # set after the clean-up finished
    assert not list(lab_server.tmp.glob("bubble-chat-*")), "Stop the chat leaves the demo's temp folder behind"

    alice.locator(".bubble-text input").fill("still there?")
    alice.locator("button.bubble-send").click()
    expect(alice.locator(".bubble-status")).to_have_text(
        "not sent: chat stopped (run the notebook again for a new chat)", timeout=WAIT_MS)
    lab.close([path])
