package gossip

import (
	"bytes"
	"cmp"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/overlay"
)

func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

func TestParseKeys(t *testing.T) {
	k1, k2 := testKey(1), bytes.Repeat([]byte{2}, 16)
	enc := base64.StdEncoding.EncodeToString
	keys, err := ParseKeys(strings.NewReader("# primary first\n" + enc(k1) + "\n\n  " + enc(k2) + "  \n"))
	if err != nil || !reflect.DeepEqual(keys, [][]byte{k1, k2}) {
		t.Fatalf("ParseKeys = %v, %v", keys, err)
	}
	for _, tc := range []struct{ in, want string }{
		{"", "no key"},
		{"# only a comment\n", "no key"},
		{"not base64!\n", "line 1: not base64"},
		{enc(k1) + "\n" + enc([]byte("short")) + "\n", "line 2: a key of 5 bytes"},
		{enc(k1) + "\n" + enc(k1) + "\n", "line 2: the same key twice"},
	} {
		if _, err := ParseKeys(strings.NewReader(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseKeys(%q) = %v, want an error saying %q", tc.in, err, tc.want)
		}
	}
	if _, err := ParseKeys(strings.NewReader("")); !errors.Is(err, ErrNoKeys) {
		t.Errorf("empty file: %v, want ErrNoKeys", err)
	}
}

func TestLoadKeysRefusesReadableFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(testKey(1))+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeys(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("LoadKeys of a 0644 file = %v, want a refusal naming the fix", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	if keys, err := LoadKeys(path); err != nil || len(keys) != 1 {
		t.Fatalf("LoadKeys = %v, %v", keys, err)
	}
}

// withKeys gives a member the gossip keys.
func withKeys(keys ...[]byte) func(*Config) {
	return func(c *Config) { c.Keys = keys }
}

// joinFails checks that m cannot join target, and that target never lists
// it as a member.
func joinFails(t *testing.T, m, target *member, others int) {
	t.Helper()
	if n, err := m.Join(t.Context(), []string{target.LocalAddr().String()}); err == nil || n != 0 {
		t.Errorf("%s joined a keyed cluster: %d, %v", m.Gossip.host, n, err)
	}
	// Give memberlist's gossip and probes time to carry anything the
	// failed join might have slipped in.
	time.Sleep(500 * time.Millisecond)
	for _, x := range target.Members() {
		if x.Host == m.Gossip.host {
			t.Errorf("%s is a member of a cluster it has no key of", m.Gossip.host)
		}
	}
	if got := len(target.Members()); got != others {
		t.Errorf("%s has %d members, want %d", target.Gossip.host, got, others)
	}
}

// TestMemberWithoutKeyCannotJoin: on real loopback sockets, a member
// without the key, or with another key, can neither join nor appear in
// the members of a keyed cluster.
func TestMemberWithoutKeyCannotJoin(t *testing.T) {
	k := testKey(1)
	a, b := newMember(t, 0, nil, withKeys(k)), newMember(t, 1, nil, withKeys(k))
	if !a.Encrypted() {
		t.Fatal("a member with keys says it is not encrypted")
	}
	if n, err := b.Join(t.Context(), []string{a.LocalAddr().String()}); n != 1 || err != nil {
		t.Fatalf("keyed Join = %d, %v", n, err)
	}
	waitFor(t, "a and b to see each other", func() bool { return len(a.Members()) == 1 && len(b.Members()) == 1 })

	plain := newMember(t, 2, nil)
	joinFails(t, plain, a, 1)
	other := newMember(t, 3, nil, withKeys(testKey(9)))
	joinFails(t, other, a, 1)
	if len(plain.Members()) != 0 || len(other.Members()) != 0 {
		t.Errorf("members without the key learned the cluster: %v, %v", plain.Members(), other.Members())
	}
}

// TestKeyRotation rotates the key of a running cluster the way
// docs/operations.md says, and checks at every step that the members
// never lose each other and that membership still spreads: a host that
// joins through a, with the keys b has at that step, is seen with its
// metadata by a and b and sees them, and once it leaves both drop it.
func TestKeyRotation(t *testing.T) {
	k1, k2 := testKey(1), testKey(2)
	a, b := newMember(t, 0, nil, withKeys(k1)), newMember(t, 1, nil, withKeys(k1))
	if n, err := b.Join(t.Context(), []string{a.LocalAddr().String()}); n != 1 || err != nil {
		t.Fatalf("Join = %d, %v", n, err)
	}
	waitFor(t, "a and b to see each other", func() bool { return len(a.Members()) == 1 && len(b.Members()) == 1 })

	// sees reports whether m's members are exactly hosts is, with the
	// metadata they gossip.
	sees := func(m *member, is ...int) bool {
		var want []overlay.Member
		for _, i := range is {
			want = append(want, expected(i))
		}
		slices.SortFunc(want, func(x, y overlay.Member) int { return cmp.Compare(x.Host, y.Host) })
		return reflect.DeepEqual(m.Members(), want)
	}
	step := 0
	check := func(what string, keys [][]byte) {
		t.Helper()
		step++
		i := 10 + step
		c := newMember(t, i, nil, withKeys(keys...))
		if n, err := c.Join(t.Context(), []string{a.LocalAddr().String()}); n != 1 || err != nil {
			t.Fatalf("%s: %s: Join = %d, %v", what, hostName(i), n, err)
		}
		waitFor(t, what+": a to see b and "+string(hostName(i)), func() bool { return sees(a, 1, i) })
		waitFor(t, what+": b to see a and "+string(hostName(i)), func() bool { return sees(b, 0, i) })
		waitFor(t, what+": "+string(hostName(i))+" to see a and b", func() bool { return sees(c, 0, 1) })
		if err := c.Leave(t.Context()); err != nil {
			t.Fatalf("%s: %s: Leave: %v", what, hostName(i), err)
		}
		waitFor(t, what+": a to drop "+string(hostName(i)), func() bool { return sees(a, 1) })
		waitFor(t, what+": b to drop "+string(hostName(i)), func() bool { return sees(b, 0) })
	}
	for _, s := range []struct {
		what         string
		keysA, keysB [][]byte
	}{
		{"new key added second everywhere", [][]byte{k1, k2}, [][]byte{k1, k2}},
		{"a sends with the new key", [][]byte{k2, k1}, [][]byte{k1, k2}},
		{"both send with the new key", [][]byte{k2, k1}, [][]byte{k2, k1}},
		{"old key removed everywhere", [][]byte{k2}, [][]byte{k2}},
	} {
		if err := a.SetKeys(s.keysA); err != nil {
			t.Fatal(err)
		}
		if err := b.SetKeys(s.keysB); err != nil {
			t.Fatal(err)
		}
		check(s.what, s.keysB)
	}
	joinFails(t, newMember(t, 2, nil, withKeys(k1)), a, 1)
	late := newMember(t, 3, nil, withKeys(k2))
	if n, err := late.Join(t.Context(), []string{a.LocalAddr().String()}); n != 1 || err != nil {
		t.Fatalf("a member with the new key: Join = %d, %v", n, err)
	}
	if err := newMember(t, 4, nil).SetKeys([][]byte{k1}); !errors.Is(err, ErrNotEncrypted) {
		t.Errorf("SetKeys without encryption = %v, want ErrNotEncrypted", err)
	}
}

// TestSetKeysRemovesEveryOldKey: cutting a ring of several keys down to
// one leaves that one alone, whatever the order of the others; a bad key
// changes nothing.
func TestSetKeysRemovesEveryOldKey(t *testing.T) {
	k1, k2, k3, k4 := testKey(1), testKey(2), testKey(3), testKey(4)
	m := newMember(t, 0, nil, withKeys(k1, k2, k3, k4))
	if err := m.SetKeys([][]byte{k4}); err != nil {
		t.Fatal(err)
	}
	if got := m.keyring.GetKeys(); !reflect.DeepEqual(got, [][]byte{k4}) {
		t.Fatalf("keys after SetKeys([k4]) = %d keys %v, want only k4", len(got), got)
	}
	if err := m.SetKeys([][]byte{k1, []byte("short")}); err == nil {
		t.Fatal("SetKeys accepted a 5-byte key")
	}
	if got := m.keyring.GetKeys(); !reflect.DeepEqual(got, [][]byte{k4}) {
		t.Fatalf("a refused SetKeys changed the ring: %v", got)
	}
}
