//go:build linux

package conformance

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/types/create"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Versions are the spec versions a plugin must support.
func Versions() []string { return []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} }

// Target describes the plugin under test and where it runs.
type Target struct {
	// Plugin is the path of the plugin binary.
	Plugin string
	// CNIPath are the directories of CNI_PATH, for plugins it delegates to.
	CNIPath []string
	// Conf returns the plugin's network configuration at a spec version.
	Conf func(version string) map[string]any
	// InHost runs fn on a thread in the host's network namespace, so that
	// the plugin it starts runs there, as under a runtime.
	InHost func(fn func() error) error
	// NewNetNS creates a container namespace that lives until t ends and
	// returns its path.
	NewNetNS func(t *testing.T) string
	// RemoveNetNS deletes a namespace NewNetNS made (for the rules about
	// a namespace that is gone).
	RemoveNetNS func(path string) error
	// Allocated reports whether the plugin holds an address for the
	// attachment; nil skips the rules that need to know.
	Allocated func(containerID, ifName string) (bool, error)
	// StopDaemon and StartDaemon stop and start the plugin's daemon; nil
	// skips the rules about a daemon that is down.
	StopDaemon, StartDaemon func() error
	// Skip names rules the plugin is known not to meet, with the reason;
	// they are reported as skipped.
	Skip map[string]string
	// NoHostInterface says the plugin creates no interface in the host's
	// namespace (macvlan, ipvlan, host-device), so its result lists none.
	NoHostInterface bool
}

// outcome is what one exec of the plugin produced.
type outcome struct {
	stdout, stderr []byte
	exit           int
	// cniErr is stdout decoded as the spec's error, when exit != 0.
	cniErr *types.Error
}

func (o outcome) String() string {
	return fmt.Sprintf("exit %d, stdout %q, stderr %q", o.exit, o.stdout, o.stderr)
}

// call execs the plugin with verb, the given environment (only these
// CNI_ variables: a missing one stays missing) and conf on stdin.
func (tg Target) call(t *testing.T, verb string, env map[string]string, stdin []byte) outcome {
	t.Helper()
	cmd := exec.Command(tg.Plugin)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "CNI_COMMAND=" + verb, "CNI_PATH=" + strings.Join(tg.CNIPath, ":")}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	var o outcome
	err := tg.InHost(func() error { return cmd.Run() })
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		o.exit = ee.ExitCode()
	case err != nil:
		t.Fatalf("exec %s %s: %v", tg.Plugin, verb, err)
	}
	o.stdout, o.stderr = stdout.Bytes(), stderr.Bytes()
	if o.exit != 0 {
		e := &types.Error{}
		if json.Unmarshal(o.stdout, e) == nil && e.Code != 0 {
			o.cniErr = e
		}
	}
	return o
}

// attachment is one container interface the suite works with.
type attachment struct {
	id, netns, ifName string
}

func (a attachment) env() map[string]string {
	env := map[string]string{"CNI_CONTAINERID": a.id, "CNI_IFNAME": a.ifName}
	if a.netns != "" {
		env["CNI_NETNS"] = a.netns
	}
	return env
}

func (tg Target) conf(t *testing.T, version string, extra map[string]any) []byte {
	t.Helper()
	c := tg.Conf(version)
	for k, v := range extra {
		c[k] = v
	}
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// add runs ADD at version and returns the raw result, failing the test
// unless it succeeded.
func (tg Target) add(t *testing.T, version string, a attachment) []byte {
	t.Helper()
	o := tg.call(t, "ADD", a.env(), tg.conf(t, version, nil))
	if o.exit != 0 {
		t.Fatalf("ADD %s at %s: %s", a.id, version, o)
	}
	t.Cleanup(func() {
		tg.call(t, "DEL", a.env(), tg.conf(t, version, map[string]any{"prevResult": json.RawMessage(o.stdout)}))
	})
	return o.stdout
}

// newAttachment returns a fresh container namespace and ID for t.
func (tg Target) newAttachment(t *testing.T, id string) attachment {
	return attachment{id: id, netns: tg.NewNetNS(t), ifName: "eth0"}
}

func parseResult(t *testing.T, raw []byte) *current.Result {
	t.Helper()
	r, err := create.CreateFromBytes(raw)
	if err != nil {
		t.Fatalf("result does not decode: %v\n%s", err, raw)
	}
	res, err := current.NewResultFromResult(r)
	if err != nil {
		t.Fatalf("result does not convert: %v", err)
	}
	return res
}

// wantError fails t unless o is the spec's error with code (and, when
// mention is not empty, a message or details mentioning it).
func wantError(t *testing.T, o outcome, code uint, mention string) {
	t.Helper()
	if o.exit == 0 {
		t.Fatalf("succeeded (%s), want error code %d", o, code)
	}
	if o.cniErr == nil {
		t.Fatalf("error is not the spec's JSON on stdout: %s", o)
	}
	if o.cniErr.Code != code {
		t.Fatalf("code %d (%s), want %d", o.cniErr.Code, o.cniErr.Msg, code)
	}
	if mention != "" && !strings.Contains(o.cniErr.Msg+" "+o.cniErr.Details, mention) {
		t.Fatalf("error %q does not mention %q", o.cniErr.Msg+": "+o.cniErr.Details, mention)
	}
}

func wantSuccess(t *testing.T, o outcome, what string) {
	t.Helper()
	if o.exit != 0 {
		t.Fatalf("%s: %s", what, o)
	}
}

// inNetNS returns a netlink handle in the namespace at path.
func inNetNS(t *testing.T, path string) *netlink.Handle {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	return h
}

// hostLinks returns the names of the links in the host's namespace.
func (tg Target) hostLinks(t *testing.T) []string {
	t.Helper()
	var names []string
	err := tg.InHost(func() error {
		links, err := netlink.LinkList()
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
		for _, l := range links {
			names = append(names, l.Attrs().Name)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(names)
	return names
}
