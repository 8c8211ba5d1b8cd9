#!/usr/bin/env python3
"""Tests of scripts/api-docs on a small module of its own.

    python3 scripts/test_api_docs.py

Each test builds a temporary buf module (one .proto with a service, a
streaming RPC, a map field, a oneof, an enum, a nested message, a
well-known type and one field without a comment), runs the generator on it
with --module/--output, and checks the Markdown and the report.
"""

import os
import re
import subprocess
import sys
import tempfile
import unittest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "api-docs")

PROTO = """\
syntax = "proto3";

// The sample package.
package sample.v1;

import "google/protobuf/timestamp.proto";

// Sends things.
service Sender {
  // Sends one thing.
  rpc Send(SendRequest) returns (SendResponse);
  // Both ways at once: a | in a comment,
  // and a second line.
  rpc Chat(stream SendRequest) returns (stream Item);
}

// What to send.
message SendRequest {
  // Where to: one of two.
  oneof target {
    // One user.
    string user_id = 1;
    // A whole tenant.
    string tenant_id = 2;
  }
  // Labels, by name.
  map<string, Item> labels = 3;
  // When it was asked for.
  google.protobuf.Timestamp at = 4;
  string undocumented_field = 5;
  // The kind.
  Kind kind = 6;
  // Several items.
  repeated Item items = 7;
  // A nested one.
  Inner inner = 8;

  // Inside SendRequest.
  message Inner {
    // Set or not.
    optional bool flag = 1;
  }
}

// The answer.
message SendResponse {
  // The item sent.
  Item item = 1; // Trailing words.
}

// Kinds of things.
enum Kind {
  KIND_UNSPECIFIED = 0;
  // Small.
  KIND_SMALL = 1;
  KIND_LARGE = 2;
}

// One item.
message Item {
  // Its name.
  //
  // A second paragraph.
  string name = 1;
}
"""

# Lines of the elements without a comment, as declared in PROTO above.
UNDOCUMENTED_FIELD_LINE = PROTO.splitlines().index("  string undocumented_field = 5;") + 1
KIND_LARGE_LINE = PROTO.splitlines().index("  KIND_LARGE = 2;") + 1


class ApiDocsTest(unittest.TestCase):
    def setUp(self):
        self.scratch = tempfile.TemporaryDirectory()
        self.addCleanup(self.scratch.cleanup)
        self.module = os.path.join(self.scratch.name, "proto")
        os.makedirs(os.path.join(self.module, "sample", "v1"))
        with open(os.path.join(self.module, "buf.yaml"), "w") as f:
            f.write("version: v2\n")
        self.proto = os.path.join(self.module, "sample", "v1", "sample.proto")
        with open(self.proto, "w") as f:
            f.write(PROTO)
        self.output = os.path.join(self.scratch.name, "api.md")

    def run_docs(self, *flags):
        return subprocess.run(
            [sys.executable, SCRIPT, "--module", self.module, "--output", self.output, *flags],
            capture_output=True, text=True)

    def generate(self):
        result = self.run_docs()
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(self.output) as f:
            return f.read(), result

    def section(self, markdown, anchor):
        """The text from an anchor to the next one."""
        start = markdown.index(f'<a name="{anchor}"></a>')
        end = markdown.find("<a name=", start + 1)
        return markdown[start:end if end != -1 else None]

    def test_header_says_generated_and_not_to_edit(self):
        markdown, _ = self.generate()
        head = "\n".join(markdown.splitlines()[:5])
        self.assertIn("scripts/api-docs", head)
        self.assertIn("do not edit", head)
        self.assertIn("sample/v1", head)

    def test_service_and_rpcs(self):
        markdown, _ = self.generate()
        service = self.section(markdown, "sample.v1.Sender")
        self.assertIn("### service `Sender`", service)
        self.assertIn("Sends things.", service)
        send = self.section(markdown, "sample.v1.Sender.Send")
        self.assertIn("`Send`([`SendRequest`](#sample.v1.SendRequest)) returns "
                      "([`SendResponse`](#sample.v1.SendResponse))", send)
        self.assertIn("Sends one thing.", send)
        chat = self.section(markdown, "sample.v1.Sender.Chat")
        self.assertIn("`Chat`(stream [`SendRequest`](#sample.v1.SendRequest)) returns "
                      "(stream [`Item`](#sample.v1.Item))", chat)
        self.assertIn("Both ways at once: a | in a comment,\nand a second line.", chat)

    def test_message_table(self):
        markdown, _ = self.generate()
        request = self.section(markdown, "sample.v1.SendRequest")
        self.assertIn("### message `SendRequest`", request)
        self.assertIn("| Field | Number | Type | Label | Description |", request)
        self.assertIn("| `user_id` | 1 | `string` | oneof `target` | One user. |", request)
        self.assertIn("| `tenant_id` | 2 | `string` | oneof `target` | A whole tenant. |", request)
        self.assertIn("| `labels` | 3 | map<`string`, [`Item`](#sample.v1.Item)> | map "
                      "| Labels, by name. |", request)
        # A well-known type is named plainly, not linked.
        self.assertIn("| `at` | 4 | `google.protobuf.Timestamp` |  | When it was asked for. |",
                      request)
        self.assertIn("| `undocumented_field` | 5 | `string` |  |  |", request)
        self.assertIn("| `kind` | 6 | [`Kind`](#sample.v1.Kind) |  | The kind. |", request)
        self.assertIn("| `items` | 7 | [`Item`](#sample.v1.Item) | repeated | Several items. |",
                      request)
        self.assertIn("| `inner` | 8 | [`SendRequest.Inner`](#sample.v1.SendRequest.Inner) |",
                      request)
        self.assertIn("oneof `target`: Where to: one of two.", request)
        inner = self.section(markdown, "sample.v1.SendRequest.Inner")
        self.assertIn("### message `SendRequest.Inner`", inner)
        self.assertIn("| `flag` | 1 | `bool` | optional | Set or not. |", inner)
        # The compiler's map entry message is no section of its own.
        self.assertNotIn("LabelsEntry", markdown)

    def test_comments_are_table_safe(self):
        markdown, _ = self.generate()
        self.assertIn("| `item` | 1 | [`Item`](#sample.v1.Item) |  "
                      "| The item sent.<br><br>Trailing words. |", markdown)
        self.assertIn("| `name` | 1 | `string` |  | Its name.<br><br>A second paragraph. |",
                      markdown)
        with open(self.proto, "w") as f:
            f.write(PROTO.replace("// Small.", "// Small | tiny,\n  // or little."))
        markdown, _ = self.generate()
        self.assertIn("| `KIND_SMALL` | 1 | Small \\| tiny, or little. |", markdown)
        # Every table row still has its five (or three) cells.
        for line in markdown.splitlines():
            if line.startswith("| `"):
                cells = len(re.findall(r"(?<!\\)\|", line)) - 1
                self.assertIn(cells, (3, 5), line)

    def test_enum_table(self):
        markdown, _ = self.generate()
        kind = self.section(markdown, "sample.v1.Kind")
        self.assertIn("### enum `Kind`", kind)
        self.assertIn("| `KIND_UNSPECIFIED` | 0 |  |", kind)
        self.assertIn("| `KIND_SMALL` | 1 | Small. |", kind)

    def test_order_is_the_files(self):
        # As declared: the enum Kind comes before the message Item.
        markdown, _ = self.generate()
        positions = [markdown.index(f'<a name="sample.v1.{name}"></a>')
                     for name in ("Sender", "SendRequest", "SendRequest.Inner",
                                  "SendResponse", "Kind", "Item")]
        self.assertEqual(positions, sorted(positions))

    def test_undocumented_elements_are_reported_with_their_lines(self):
        _, result = self.generate()
        lines = [line for line in result.stderr.splitlines() if "has no comment" in line]
        self.assertEqual(lines, [
            f"{self.module}/sample/v1/sample.proto:{UNDOCUMENTED_FIELD_LINE}: "
            "field SendRequest.undocumented_field has no comment",
            f"{self.module}/sample/v1/sample.proto:{KIND_LARGE_LINE}: "
            "enum value Kind.KIND_LARGE has no comment",
        ])

    def test_check(self):
        self.generate()
        # Up to date, but with undocumented elements: fails unless allowed.
        result = self.run_docs("--check")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("has no comment", result.stderr)
        self.assertNotIn("stale", result.stderr)
        result = self.run_docs("--check", "--allow-undocumented")
        self.assertEqual(result.returncode, 0, result.stderr)
        # A comment changed: the committed file is stale, and the diff shows it.
        with open(self.proto, "w") as f:
            f.write(PROTO.replace("// Sends one thing.", "// Sends exactly one thing."))
        result = self.run_docs("--check", "--allow-undocumented")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("api.md is stale: run scripts/api-docs", result.stderr)
        self.assertIn("-Sends one thing.", result.stdout)
        self.assertIn("+Sends exactly one thing.", result.stdout)
        # --check writes nothing.
        with open(self.output) as f:
            self.assertIn("Sends one thing.", f.read())
        # Every element documented: --check passes without the allowance.
        with open(self.proto, "w") as f:
            f.write(PROTO.replace("  string undocumented_field = 5;",
                                  "  // Now documented.\n  string undocumented_field = 5;")
                    .replace("  KIND_LARGE = 2;", "  KIND_LARGE = 2; // Large."))
        self.generate()
        result = self.run_docs("--check")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("has no comment", result.stderr)

    def test_output_is_deterministic_and_has_no_machine_paths(self):
        first, _ = self.generate()
        second, _ = self.generate()
        self.assertEqual(first, second)
        self.assertNotIn(self.scratch.name, first)
        self.assertTrue(first.endswith("\n") and not first.endswith("\n\n"))
        self.assertFalse([line for line in first.splitlines() if line != line.rstrip()])


if __name__ == "__main__":
    unittest.main()
