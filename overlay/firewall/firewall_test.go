package firewall

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/overlaynet/overlay/overlay"
)

func def(name, cidr string) overlay.Network {
	return overlay.Network{Name: name, CIDR: netip.MustParsePrefix(cidr), BlockBits: 26, VNI: 1, Port: 4789}
}

func TestRules(t *testing.T) {
	off := false
	quiet := def("quiet", "10.3.0.0/16")
	quiet.Masquerade = &off
	forward, post := Rules([]overlay.Network{def("red", "10.1.0.0/16"), quiet, def("blue", "10.2.0.0/16")})
	if len(forward) != 12 {
		t.Fatalf("%d forward rules, want 4 per network", len(forward))
	}
	if forward[0].Network != "blue" || forward[0].In != "ovbr-blue" || forward[0].OutPrefix != "ovbr-" || forward[0].Out != "ovbr-blue" {
		t.Fatalf("first rule %+v: want blue's bridge to other bridges, networks sorted", forward[0])
	}
	var masq []string
	for _, r := range post {
		masq = append(masq, r.CIDR)
	}
	if !slices.Equal(masq, []string{"10.2.0.0/16", "10.1.0.0/16"}) {
		t.Fatalf("masquerade for %v; want blue and red, not quiet", masq)
	}
	// Comments tell rules apart: they are what the convergence compares.
	seen := map[string]bool{}
	for _, r := range append(forward, post...) {
		if seen[r.Comment()] {
			t.Fatalf("two rules share the comment %q", r.Comment())
		}
		seen[r.Comment()] = true
	}
	if f, p := Rules(nil); len(f)+len(p) != 0 {
		t.Fatal("rules without networks")
	}
}
