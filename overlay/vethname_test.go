package overlay

import (
	"fmt"
	"strings"
	"testing"
)

func TestHostVethName(t *testing.T) {
	key := func(id, ifname string) AttachmentKey {
		return AttachmentKey{ContainerID: id, IfName: ifname}
	}
	a := HostVethName("default", key("abc", "eth0"))
	if len(a) > 15 || !strings.HasPrefix(a, HostVethPrefix) {
		t.Fatalf("%q: want at most 15 bytes starting with %q", a, HostVethPrefix)
	}
	if a != HostVethName("default", key("abc", "eth0")) {
		t.Fatal("name is not deterministic: DEL could not find it")
	}
	seen := map[string]bool{a: true}
	for i := range 1000 {
		n := HostVethName("default", key(fmt.Sprintf("c%d", i), "eth0"))
		if seen[n] {
			t.Fatalf("collision at %d", i)
		}
		seen[n] = true
	}
	if HostVethName("default", key("abc", "eth1")) == a || HostVethName("blue", key("abc", "eth0")) == a {
		t.Fatal("interface or network does not change the name")
	}
}
