package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/overlaynet/overlay/internal/etcdtest"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
)

type ctl struct {
	t        *testing.T
	endpoint string
}

// run runs overlayctl against the test's etcd and returns its exit code,
// standard output and standard error.
func (c ctl) run(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(context.Background(), append([]string{"--etcd-endpoints", c.endpoint}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

func TestNetworkCommands(t *testing.T) {
	cli := etcdtest.Start(t)
	c := ctl{t: t, endpoint: strings.Join(cli.Endpoints(), ",")}

	code, out, errs := c.run("network", "create", "red", "--cidr", "10.1.0.0/16", "--label", "team=a", "--label", "env=dev", "--mtu", "1400")
	if code != 0 || !strings.Contains(out, "created network red") || !strings.Contains(out, "vni 7100") {
		t.Fatalf("create: %d %q %q", code, out, errs)
	}
	code, out, _ = c.run("network", "create", "--cidr", "10.2.0.0/16", "--vni", "42", "--masquerade=false", "blue")
	if code != 0 || !strings.Contains(out, "vni 42") {
		t.Fatalf("create with the name last: %d %q", code, out)
	}

	code, out, _ = c.run("network", "list")
	if code != 0 || !strings.Contains(out, "NAME") || !strings.Contains(out, "env=dev,team=a") || strings.Index(out, "blue") > strings.Index(out, "red") {
		t.Fatalf("list: %d\n%s", code, out)
	}
	code, out, _ = c.run("network", "list", "--json")
	var list []overlay.Network
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || len(list) != 2 || list[1].MTU != 1400 || list[0].MasqueradeOn() || !list[1].MasqueradeOn() {
		t.Fatalf("list --json: %d %s", code, out)
	}

	// Bad input: a clear message, exit code 1 or 2, nothing created.
	for _, bad := range []struct {
		args []string
		code int
		says string
	}{
		{[]string{"network", "create", "green", "--cidr", "10.1.5.0/24"}, 1, `overlaps network "red"`},
		{[]string{"network", "create", "green", "--cidr", "10.3.0.0/16", "--vni", "42"}, 1, `vni 42 is used by network "blue"`},
		{[]string{"network", "create", "Green!", "--cidr", "10.3.0.0/16"}, 1, "name"},
		{[]string{"network", "create", "green"}, 2, "--cidr is required"},
		{[]string{"network", "create", "green", "--cidr", "10.3.0.0"}, 2, "want an IPv4 prefix"},
		{[]string{"network", "create", "green", "--cidr", "10.3.0.0/16", "--label", "novalue"}, 2, "want KEY=VALUE"},
		{[]string{"network", "create", "red", "--cidr", "10.9.0.0/16"}, 1, `network "red" exists`},
		{[]string{"network", "frobnicate"}, 2, "unknown command"},
		{[]string{"network", "delete"}, 2, "want 1 argument"},
		{[]string{"network", "inspect", "nope"}, 1, `network "nope" does not exist`},
	} {
		code, _, errs := c.run(bad.args...)
		if code != bad.code || !strings.Contains(errs, bad.says) {
			t.Errorf("%q: exit %d, %q; want %d saying %q", bad.args, code, errs, bad.code, bad.says)
		}
	}

	// A network in use is refused, then deleted with --force.
	store := etcd.NewStore(cli, "")
	red, err := store.Network(context.Background(), "red")
	if err != nil {
		t.Fatal(err)
	}
	p := store.Pool(red, "host-a")
	b, err := p.Claim(context.Background(), netip.Prefix{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	al := overlay.Allocation{Key: overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"}, Addr: netip.PrefixFrom(overlay.Gateway(b).Next(), b.Bits()), Host: "host-a",
		Endpoint: overlay.Endpoint{MAC: net.HardwareAddr{2, 0, 0, 0, 0, 0xc1}, Labels: map[string]string{"app": "web"}}}
	if _, err := p.Mirror(context.Background(), []overlay.Allocation{al}); err != nil {
		t.Fatal(err)
	}
	code, out, errs = c.run("endpoint", "list", "red")
	if code != 0 || !strings.Contains(out, "MAC") || !regexp.MustCompile(al.Addr.String()+` +host-a +c1 +eth0 +02:00:00:00:00:c1 +app=web`).MatchString(out) {
		t.Fatalf("endpoint list: %d %q\n%s", code, errs, out)
	}
	code, out, _ = c.run("endpoint", "list", "--json", "red")
	var eps []etcd.EndpointRecord
	if code != 0 || json.Unmarshal([]byte(out), &eps) != nil || len(eps) != 1 || eps[0].Addr != al.Addr || eps[0].MAC != "02:00:00:00:00:c1" || eps[0].Labels["app"] != "web" {
		t.Fatalf("endpoint list --json: %d %s", code, out)
	}
	for _, filter := range [][]string{{"--label", "app=db"}, {"--label", "app"}, {"--host", "host-b"}} {
		args := append([]string{"endpoint", "list", "red"}, filter...)
		code, out, errs = c.run(args...)
		if filter[1] == "app" {
			if code != 2 {
				t.Errorf("%q: exit %d; want 2", args, code)
			}
			continue
		}
		if code != 0 || strings.Contains(out, "c1") {
			t.Errorf("%q: %d %q %q; want no endpoint", args, code, out, errs)
		}
	}
	if code, _, errs = c.run("endpoint", "list", "nope"); code != 1 || !strings.Contains(errs, `network "nope" does not exist`) {
		t.Errorf("endpoint list of an unknown network: %d %q", code, errs)
	}
	code, out, _ = c.run("network", "inspect", "red")
	if code != 0 || !strings.Contains(out, "host-a") || !strings.Contains(out, "1024 blocks of /26") {
		t.Fatalf("inspect: %d\n%s", code, out)
	}
	code, _, errs = c.run("network", "delete", "red")
	if code != 1 || !strings.Contains(errs, "host-a (1)") || !strings.Contains(errs, "force") {
		t.Fatalf("delete in use: %d %q", code, errs)
	}
	code, out, _ = c.run("network", "delete", "--force", "red")
	if code != 0 || !strings.Contains(out, "released the addresses of 1") {
		t.Fatalf("delete --force: %d %q", code, out)
	}
	code, out, _ = c.run("network", "delete", "blue")
	if code != 0 || !strings.Contains(out, "deleted network blue") {
		t.Fatalf("delete: %d %q", code, out)
	}
	if code, out, _ = c.run("network", "list", "--json"); code != 0 || strings.TrimSpace(out) != "[]" {
		t.Fatalf("list after deleting all: %d %q", code, out)
	}
}

func TestUnreachableEtcd(t *testing.T) {
	var out, errb bytes.Buffer
	code := run(context.Background(), []string{"--etcd-endpoints", "unix:///nonexistent/etcd.sock", "--etcd-dial-timeout", "300ms", "network", "list"}, &out, &errb)
	if code != 1 || !strings.Contains(errb.String(), "--etcd-endpoints") {
		t.Fatalf("exit %d, %q; want 1 and a hint", code, errb.String())
	}
}

func TestVersion(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"--version"}, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "overlayctl ") || !strings.Contains(out.String(), "go1.") {
		t.Fatalf("--version: exit %d, %q, %q", code, out.String(), errb.String())
	}
}

// TestEnvironment: the connection flags come from OVERLAYCTL_ variables
// too, the command line winning; a bad value names the variable.
func TestEnvironment(t *testing.T) {
	cli := etcdtest.Start(t)
	t.Setenv("OVERLAYCTL_ETCD_ENDPOINTS", strings.Join(cli.Endpoints(), ","))
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"network", "list"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "NAME") {
		t.Fatalf("network list with the endpoint from the environment: %d %q %q", code, out.String(), errb.String())
	}
	out.Reset()
	errb.Reset()
	if code := run(context.Background(), []string{"--etcd-endpoints", "unix:///nonexistent/etcd.sock", "--etcd-dial-timeout", "300ms", "network", "list"}, &out, &errb); code != 1 {
		t.Fatalf("the command line did not win over the environment: %d %q", code, errb.String())
	}
	t.Setenv("OVERLAYCTL_ETCD_DIAL_TIMEOUT", "soon")
	errb.Reset()
	if code := run(context.Background(), []string{"network", "list"}, &out, &errb); code != 2 || !strings.Contains(errb.String(), "OVERLAYCTL_ETCD_DIAL_TIMEOUT") {
		t.Fatalf("a bad value in the environment: %d %q", code, errb.String())
	}
}
