"""The classroom (notebook 12) in a real browser: the dashboard notebook draws its room in JupyterLab, and the
projector page a teacher's node serves draws the room's nodes in Chromium, with no Jupyter and no network beyond
the node (its Content-Security-Policy allows nothing else: a violation would show as a console error).
"""
from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import requests

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "12_classroom.ipynb"
WAIT_MS = 60_000  # generous: the page polls every 2 s, on a busy machine


def test_the_dashboard_notebook_renders_its_graph_in_jupyterlab(lab, lab_folder):
    from playwright.sync_api import expect

    path = lab.run_a_copy(NOTEBOOK, lab_folder)
    dashboard = lab.page.locator(".bubble-dashboard").last
    picture = dashboard.locator(".bubble-dashboard-picture")
    expect(picture).to_be_visible(timeout=WAIT_MS)
    size = picture.evaluate("img => [img.naturalWidth, img.naturalHeight]")
    assert size[0] > 400 and size[1] > 200, f"the dashboard's graph is not drawn: {size}"
    expect(dashboard.locator(".bubble-scoreboard")).to_contain_text("Ada", timeout=WAIT_MS)  # the scoreboard, too
    drawn = lab.page.locator(".jp-OutputArea-output img").count()
    assert drawn >= 3, f"the room's pictures (two figures and the dashboard) are missing: {drawn} images"
    lab.close([path])


def test_the_projector_page_draws_the_rooms_nodes_in_chromium(lab, tmp_path):
    from playwright.sync_api import expect

    from bubble_ref.classroom import ClassroomConfig, start_room, wait_for

    room = start_room(tmp_path, ["Ada", "Grace", "Alan"], room=ClassroomConfig(
        room="projector test", hello_interval=timedelta(seconds=0.5), away_after=timedelta(seconds=4),
        public_refresh=timedelta(seconds=1), hellos_per_minute=600))
    context = lab.page.context.browser.new_context(viewport={"width": 1400, "height": 1000})  # the lab's Chromium
    page = context.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    try:
        wait_for(lambda: all(seat.member.joined for seat in room.seats.values()), "the students to join")
        page.goto(f"{room.url}/classroom/projector", timeout=WAIT_MS)
        nodes = page.locator("#mesh g.node")
        expect(nodes).to_have_count(4, timeout=WAIT_MS)
        for name in ("teacher", "Ada", "Grace", "Alan"):
            expect(page.locator("#mesh text", has_text=name)).to_have_count(1, timeout=WAIT_MS)
        expect(page.locator("#room")).to_have_text("projector test")
        expect(page.locator("#messages tbody tr")).to_have_count(4)
        expect(page.locator("#status")).to_contain_text("public view")
        ada = page.locator("#messages tbody tr", has_text="Ada").locator("td")
        expect(ada.nth(1)).to_have_text(re.compile(r"^≥ \d*0$"))  # the public sees counts in tens, no more
        expect(ada.nth(4)).to_have_text("–")  # and no reputation scores: those are the teacher's
        assert page.locator("#mesh line.link").count() >= 3  # every student links to the teacher's node

        token = room.token
        demo = requests.post(f"{room.url}/classroom/demo", json={"from": "Ada"}, timeout=10,
                             headers={"Authorization": f"Bearer {token}"})
        assert demo.status_code == 202
        page.goto(f"{room.url}/classroom/projector#token={token}", timeout=WAIT_MS)  # the teacher's own screen
        expect(page.locator("#status")).to_contain_text("teacher's view", timeout=WAIT_MS)
        expect(page.locator("#summary")).to_contain_text("demo packet reached 4 of 4", timeout=WAIT_MS)
        expect(page.locator("#mesh line.link.flood")).to_have_count(3, timeout=WAIT_MS)  # a tree over 4 nodes
        expect(page.locator("#mesh g.node.lit")).to_have_count(4, timeout=WAIT_MS)
        ada = page.locator("#messages tbody tr", has_text="Ada").locator("td")
        expect(ada.nth(4)).to_have_text(re.compile(r"^[01]\.\d\d$"))  # the teacher's view has her score
        expect(ada.nth(1)).to_have_text(re.compile(r"^\d+$"))  # and exact counts
        assert not errors, f"the page logged errors (a Content-Security-Policy violation would be one): {errors}"
    finally:
        context.close()
        room.stop()
