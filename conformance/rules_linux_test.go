//go:build linux

package conformance

import (
	"os"
	"strings"
	"testing"
)

// TestDocsListEveryRule: docs/cni.md, where the results are, names every
// rule the suite checks.
func TestDocsListEveryRule(t *testing.T) {
	doc, err := os.ReadFile("../docs/cni.md")
	if err != nil {
		t.Fatal(err)
	}
	rules := Rules()
	if len(rules) == 0 {
		t.Fatal("no rules")
	}
	for _, r := range rules {
		if !strings.Contains(string(doc), "| "+r+" |") {
			t.Errorf("docs/cni.md has no row for rule %s", r)
		}
	}
}
