package overlay

import (
	"errors"
	"net/netip"
	"regexp"
	"strings"
	"testing"
)

func testNetwork() Network {
	return Network{Name: "default", CIDR: netip.MustParsePrefix("198.19.0.0/16"), BlockBits: 26, VNI: 4096, Port: 4789}
}

func TestNetworkValidate(t *testing.T) {
	if err := testNetwork().Validate(); err != nil {
		t.Fatalf("valid network: %v", err)
	}
	tests := []struct {
		name   string
		mutate func(*Network)
		want   string
	}{
		{"empty name", func(n *Network) { n.Name = "" }, "name"},
		{"long name", func(n *Network) { n.Name = "abcdefghijk" }, "name"},
		{"upper-case name", func(n *Network) { n.Name = "Default" }, "name"},
		{"no cidr", func(n *Network) { n.CIDR = netip.Prefix{} }, "cidr"},
		{"ipv6 cidr", func(n *Network) { n.CIDR = netip.MustParsePrefix("2001:db8::/64") }, "cidr"},
		{"host bits", func(n *Network) { n.CIDR = netip.MustParsePrefix("198.19.0.1/16") }, "host bits"},
		{"cidr smaller than block", func(n *Network) { n.CIDR = netip.MustParsePrefix("198.19.0.0/28") }, "too small"},
		{"block too small", func(n *Network) { n.BlockBits = 31 }, "blockBits"},
		{"too many blocks", func(n *Network) { n.CIDR = netip.MustParsePrefix("10.0.0.0/8"); n.BlockBits = 30 }, "more than 65536 blocks"},
		{"vni zero", func(n *Network) { n.VNI = 0 }, "vni"},
		{"vni too large", func(n *Network) { n.VNI = 1 << 24 }, "vni"},
		{"port zero", func(n *Network) { n.Port = 0 }, "port"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := testNetwork()
			tt.mutate(&n)
			err := n.Validate()
			if !errors.Is(err, ErrInvalidNetwork) {
				t.Fatalf("Validate() = %v, want ErrInvalidNetwork", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Validate() = %q, want it to mention %q", err, tt.want)
			}
		})
	}
}

func TestNetworkDiff(t *testing.T) {
	a := testNetwork()
	if d := a.Diff(a); d != "" {
		t.Errorf("Diff(same) = %q", d)
	}
	b := a
	b.VNI = 7
	if d := a.Diff(b); d != "vni" {
		t.Errorf("Diff = %q, want vni", d)
	}
	b = a
	b.BlockBits = 24
	if d := a.Diff(b); d != "blockBits" {
		t.Errorf("Diff = %q, want blockBits", d)
	}
}

func TestBlocks(t *testing.T) {
	n := testNetwork()
	if got := n.NumBlocks(); got != 1024 {
		t.Fatalf("NumBlocks = %d, want 1024", got)
	}
	for _, tc := range []struct {
		i    int
		want string
	}{{0, "198.19.0.0/26"}, {1, "198.19.0.64/26"}, {4, "198.19.1.0/26"}, {1023, "198.19.255.192/26"}} {
		b := n.Block(tc.i)
		if b.String() != tc.want {
			t.Errorf("Block(%d) = %s, want %s", tc.i, b, tc.want)
		}
		if got := n.BlockIndex(b); got != tc.i {
			t.Errorf("BlockIndex(%s) = %d, want %d", b, got, tc.i)
		}
	}
	for _, bad := range []string{"198.19.0.0/24", "198.20.0.0/26", "198.19.0.1/26"} {
		if got := n.BlockIndex(netip.MustParsePrefix(bad)); got != -1 {
			t.Errorf("BlockIndex(%s) = %d, want -1", bad, got)
		}
	}
	b := netip.MustParsePrefix("198.19.0.64/26")
	if g := Gateway(b); g.String() != "198.19.0.65" {
		t.Errorf("Gateway = %s", g)
	}
	if g := Broadcast(b); g.String() != "198.19.0.127" {
		t.Errorf("Broadcast = %s", g)
	}
}

func TestDeviceNamesFitKernelLimit(t *testing.T) {
	n := testNetwork()
	n.Name = strings.Repeat("a", MaxNameLen)
	for _, name := range []string{n.BridgeName(), n.VXLANName()} {
		if len(name) > 15 {
			t.Errorf("%q is longer than 15 bytes", name)
		}
	}
}

// nameRE is the rule validName implements by hand: the fuzz test's oracle.
var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]*[a-z0-9])?$`)

func FuzzValidName(f *testing.F) {
	for _, s := range []string{"default", "a", "-a", "a-", "a--b", "A", "", "a_b", "\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, want := validName(s), nameRE.MatchString(s); got != want {
			t.Fatalf("validName(%q) = %v, want %v", s, got, want)
		}
	})
}
