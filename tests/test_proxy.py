"""
The data port's pure parts: request targets and header filtering.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from turso_twisted.errors import Refusal, status_for
from turso_twisted.proxy import end_to_end, split_target


class SplitTargetTests(SynchronousTestCase):
    def test_strips_the_namespace(self) -> None:
        self.assertEqual(split_target(b"/alpha/v2/pipeline"), ("alpha", b"/v2/pipeline"))
        self.assertEqual(split_target(b"/alpha/pull-updates?x=1&y"), ("alpha", b"/pull-updates?x=1&y"))
        self.assertEqual(split_target(b"/alpha"), ("alpha", b"/"))
        self.assertEqual(split_target(b"/alpha?q"), ("alpha", b"/?q"))
        self.assertEqual(split_target(b"/alpha/"), ("alpha", b"/"))
        self.assertEqual(split_target(b"/alpha/a%2Fb"), ("alpha", b"/a%2Fb"))

    def test_refusals(self) -> None:
        for target, status in ((b"/", 404), (b"//x", 404), (b"*", 400), (b"http://h/alpha/x", 400),
                               (b"/Alpha/x", 400), (b"/%61lpha/x", 400), (b"/../x", 400)):
            with self.assertRaises(Refusal, msg=target) as caught:
                split_target(target)
            self.assertEqual(status_for(caught.exception), status, target)


class HeaderTests(SynchronousTestCase):
    def test_hop_by_hop_and_connection_named_headers_dropped(self) -> None:
        headers = [(b"Connection", b"keep-alive, X-Hop"), (b"Keep-Alive", b"5"), (b"X-Hop", b"1"),
                   (b"Transfer-Encoding", b"chunked"), (b"Content-Type", b"application/json"),
                   (b"X-End", b"2")]
        self.assertEqual(end_to_end(headers), [(b"Content-Type", b"application/json"), (b"X-End", b"2")])


class SplitTargetPropertyTests(SynchronousTestCase):
    @given(st.from_regex(rb"\A[a-z0-9][a-z0-9_-]{0,62}\Z"), st.binary(max_size=40), st.binary(max_size=20))
    def test_valid_names_route_the_rest_unchanged(self, name: bytes, rest: bytes, query: bytes) -> None:
        rest = rest.replace(b"?", b"")
        self.assertEqual(split_target(b"/" + name + b"/" + rest + b"?" + query),
                         (name.decode(), b"/" + rest + b"?" + query))

    @given(st.binary(min_size=1, max_size=70).filter(lambda b: b"/" not in b and b"?" not in b))
    def test_anything_else_is_refused_without_decoding(self, first: bytes) -> None:
        from turso_twisted.names import is_valid

        if is_valid(first):
            self.assertEqual(split_target(b"/" + first + b"/x")[0], first.decode())
            return
        with self.assertRaises(Refusal) as caught:
            split_target(b"/" + first + b"/x")
        self.assertEqual(status_for(caught.exception), 400)
