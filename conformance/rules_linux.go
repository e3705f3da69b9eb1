//go:build linux

package conformance

import (
	"encoding/json"
	"fmt"
	"net"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"
)

// Run checks the plugin described by tg against every rule, each in a
// subtest named for it.
func Run(t *testing.T, tg Target) {
	for _, r := range rules() {
		t.Run(r.name, func(t *testing.T) {
			if why, ok := tg.Skip[r.name]; ok {
				t.Skip("known difference: " + why)
			}
			r.check(t, tg)
		})
	}
}

type rule struct {
	name  string
	check func(*testing.T, Target)
}

// Rules returns the names of the rules Run checks, in order.
func Rules() []string {
	var names []string
	for _, r := range rules() {
		names = append(names, r.name)
	}
	return names
}

func rules() []rule {
	return []rule{
		// Protocol.
		{"VERSION_lists_0.3.1_0.4.0_1.0.0_1.1.0", versionLists},
		{"unsupported_config_version_gives_code_1", unsupportedVersion},
		{"CHECK_below_0.4.0_gives_code_1", checkBelow040},
		{"STATUS_and_GC_below_1.1.0_give_code_1", statusGCBelow110},
		{"missing_environment_gives_code_4_naming_variables", missingEnv},
		{"undecodable_stdin_gives_code_6", undecodable},
		{"invalid_container_ID_gives_code_4", invalidContainerID},
		{"capabilities_key_is_tolerated", capabilitiesTolerated},
		{"unknown_CNI_ARGS_tolerated_with_IgnoreUnknown", ignoreUnknown},
		// ADD.
		{"ADD_result_is_in_the_config_version", addResultVersion},
		{"ADD_result_lists_host_and_container_interfaces", addResultInterfaces},
		{"namespace_matches_the_result", namespaceMatches},
		{"gateway_answers", gatewayAnswers},
		{"ADD_of_existing_interface_fails_and_keeps_the_first", addExisting},
		{"failed_ADD_then_DEL_leaves_nothing", failedAddThenDel},
		// DEL.
		{"DEL_succeeds_twice", delTwice},
		{"DEL_succeeds_with_CNI_NETNS_unset_and_frees_the_address", delNetnsUnset},
		{"DEL_succeeds_with_the_namespace_deleted_and_frees_the_address", delNetnsGone},
		{"DEL_succeeds_without_prevResult", delNoPrevResult},
		{"DEL_succeeds_for_a_container_never_added", delNeverAdded},
		// CHECK.
		{"CHECK_passes_right_after_ADD", checkAfterAdd},
		{"CHECK_fails_when_the_address_is_removed", checkAddressRemoved},
		{"CHECK_fails_when_the_interface_is_removed", checkInterfaceRemoved},
		{"CHECK_tolerates_changes_of_chained_plugins", checkTolerates},
		{"CHECK_fails_when_the_daemon_is_down", checkDaemonDown},
		// STATUS.
		{"STATUS_is_0_when_ADD_can_be_served", statusReady},
		{"STATUS_is_50_when_the_daemon_is_down", statusDaemonDown},
		// GC.
		{"GC_releases_only_what_is_not_listed_and_prints_nothing", gcReleases},
		{"GC_reads_both_attachment_keys", gcBothKeys},
	}
}

func versionLists(t *testing.T, tg Target) {
	o := tg.call(t, "VERSION", nil, []byte(`{"cniVersion":"1.1.0"}`))
	wantSuccess(t, o, "VERSION")
	var v struct {
		SupportedVersions []string `json:"supportedVersions"`
	}
	if err := json.Unmarshal(o.stdout, &v); err != nil {
		t.Fatalf("VERSION output does not decode: %v: %s", err, o.stdout)
	}
	for _, want := range Versions() {
		if !slices.Contains(v.SupportedVersions, want) {
			t.Errorf("supportedVersions %v lacks %s", v.SupportedVersions, want)
		}
	}
}

func unsupportedVersion(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "badversion")
	o := tg.call(t, "ADD", a.env(), tg.conf(t, "9.9.9", nil))
	cleanupIfAdded(t, tg, a, o)
	wantError(t, o, types.ErrIncompatibleCNIVersion, "")
}

// cleanupIfAdded deletes what an ADD that should have failed made.
func cleanupIfAdded(t *testing.T, tg Target, a attachment, o outcome) {
	if o.exit == 0 {
		t.Cleanup(func() { tg.call(t, "DEL", a.env(), tg.conf(t, "1.1.0", nil)) })
	}
}

func checkBelow040(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "check031")
	o := tg.call(t, "CHECK", a.env(), tg.conf(t, "0.3.1", nil))
	wantError(t, o, types.ErrIncompatibleCNIVersion, "")
}

func statusGCBelow110(t *testing.T, tg Target) {
	for _, verb := range []string{"STATUS", "GC"} {
		o := tg.call(t, verb, nil, tg.conf(t, "1.0.0", nil))
		wantError(t, o, types.ErrIncompatibleCNIVersion, "")
	}
}

func missingEnv(t *testing.T, tg Target) {
	o := tg.call(t, "ADD", map[string]string{"CNI_CONTAINERID": "noenv"}, tg.conf(t, "1.1.0", nil))
	wantError(t, o, types.ErrInvalidEnvironmentVariables, "CNI_NETNS")
	if !strings.Contains(o.cniErr.Msg+o.cniErr.Details, "CNI_IFNAME") {
		t.Errorf("error %q does not name CNI_IFNAME too", o.cniErr.Msg)
	}
}

func undecodable(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "garbage")
	o := tg.call(t, "ADD", a.env(), []byte("{not json"))
	wantError(t, o, types.ErrDecodingFailure, "")
}

func invalidContainerID(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "x")
	a.id = "-starts/badly"
	o := tg.call(t, "ADD", a.env(), tg.conf(t, "1.1.0", nil))
	cleanupIfAdded(t, tg, a, o)
	wantError(t, o, types.ErrInvalidEnvironmentVariables, "")
}

func capabilitiesTolerated(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "caps")
	o := tg.call(t, "ADD", a.env(), tg.conf(t, "1.1.0", map[string]any{"capabilities": map[string]bool{"portMappings": true}}))
	wantSuccess(t, o, "ADD with a capabilities key")
	wantSuccess(t, tg.call(t, "DEL", a.env(), tg.conf(t, "1.1.0", nil)), "DEL after it")
}

func ignoreUnknown(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "args")
	env := a.env()
	env["CNI_ARGS"] = "IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=default"
	o := tg.call(t, "ADD", env, tg.conf(t, "1.1.0", nil))
	wantSuccess(t, o, "ADD with unknown CNI_ARGS and IgnoreUnknown=1")
	wantSuccess(t, tg.call(t, "DEL", env, tg.conf(t, "1.1.0", nil)), "DEL after it")
}

func addResultVersion(t *testing.T, tg Target) {
	for _, v := range Versions() {
		a := tg.newAttachment(t, "ver"+strings.ReplaceAll(v, ".", ""))
		raw := tg.add(t, v, a)
		var got struct {
			CNIVersion string `json:"cniVersion"`
		}
		if err := json.Unmarshal(raw, &got); err != nil || got.CNIVersion != v {
			t.Errorf("ADD at %s returned cniVersion %q (%v)", v, got.CNIVersion, err)
		}
		parseResult(t, raw)
	}
}

func addResultInterfaces(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "ifaces")
	res := parseResult(t, tg.add(t, "1.1.0", a))
	var host, cont = -1, -1
	for i, ifc := range res.Interfaces {
		switch {
		case ifc.Sandbox == a.netns && ifc.Name == a.ifName:
			cont = i
		case ifc.Sandbox == "":
			host = i
		}
	}
	if cont < 0 || (host < 0 && !tg.NoHostInterface) {
		t.Fatalf("interfaces %+v: want a host interface and %s with sandbox %s", res.Interfaces, a.ifName, a.netns)
	}
	if len(res.IPs) == 0 {
		t.Fatal("result has no address")
	}
	for _, ip := range res.IPs {
		if ip.Interface == nil || *ip.Interface != cont {
			t.Errorf("address %s points at interface %v, want %d (the container's)", ip.Address.String(), ip.Interface, cont)
		}
	}
}

func namespaceMatches(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "matches")
	res := parseResult(t, tg.add(t, "1.1.0", a))
	h := inNetNS(t, a.netns)
	link, err := h.LinkByName(a.ifName)
	if err != nil {
		t.Fatalf("%s is not in the namespace: %v", a.ifName, err)
	}
	for _, ifc := range res.Interfaces {
		if ifc.Sandbox != a.netns {
			continue
		}
		if ifc.Mac != "" && ifc.Mac != link.Attrs().HardwareAddr.String() {
			t.Errorf("result MAC %s, interface has %s", ifc.Mac, link.Attrs().HardwareAddr)
		}
		if ifc.Mtu != 0 && ifc.Mtu != link.Attrs().MTU {
			t.Errorf("result MTU %d, interface has %d", ifc.Mtu, link.Attrs().MTU)
		}
	}
	addrs, _ := h.AddrList(link, netlink.FAMILY_ALL)
	for _, ip := range res.IPs {
		found := false
		for _, ad := range addrs {
			found = found || ad.IPNet.String() == ip.Address.String()
		}
		if !found {
			t.Errorf("address %s of the result is not on %s", ip.Address.String(), a.ifName)
		}
	}
	routes, _ := h.RouteList(nil, netlink.FAMILY_ALL)
	for _, r := range res.Routes {
		found := false
		for _, kr := range routes {
			dst := "0.0.0.0/0"
			if kr.Dst != nil {
				dst = kr.Dst.String()
			}
			found = found || (dst == r.Dst.String() && (r.GW == nil || r.GW.Equal(kr.Gw)))
		}
		if !found {
			t.Errorf("route %s via %v of the result is not in the namespace", r.Dst.String(), r.GW)
		}
	}
}

func gatewayAnswers(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "gateway")
	res := parseResult(t, tg.add(t, "1.1.0", a))
	gateways := 0
	defer func() {
		if gateways == 0 {
			t.Skip("the result names no gateway")
		}
	}()
	for _, ip := range res.IPs {
		if ip.Gateway == nil {
			continue
		}
		gateways++
		out, err := exec.Command("nsenter", "--net="+a.netns, "ping", "-c", "1", "-W", "2", ip.Gateway.String()).CombinedOutput()
		if err != nil {
			t.Errorf("gateway %s does not answer: %v\n%s", ip.Gateway, err, out)
		}
	}
}

func addExisting(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "existing")
	first := parseResult(t, tg.add(t, "1.1.0", a))
	o := tg.call(t, "ADD", a.env(), tg.conf(t, "1.1.0", nil))
	if o.exit == 0 {
		t.Fatal("second ADD of an existing interface succeeded")
	}
	if o.cniErr == nil {
		t.Fatalf("error is not the spec's JSON: %s", o)
	}
	prev, _ := json.Marshal(first)
	chk := tg.call(t, "CHECK", a.env(), tg.conf(t, "1.1.0", map[string]any{"prevResult": json.RawMessage(prev)}))
	wantSuccess(t, chk, "CHECK of the first attachment after the failed second ADD")
}

func failedAddThenDel(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "failed")
	// The interface name is taken inside the namespace: ADD must fail.
	h := inNetNS(t, a.netns)
	if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: a.ifName}, PeerName: "squatter"}); err != nil {
		t.Fatal(err)
	}
	before := tg.hostLinks(t)
	o := tg.call(t, "ADD", a.env(), tg.conf(t, "1.1.0", nil))
	if o.exit == 0 {
		t.Fatal("ADD over an existing interface succeeded")
	}
	wantSuccess(t, tg.call(t, "DEL", a.env(), tg.conf(t, "1.1.0", nil)), "DEL after the failed ADD")
	if after := tg.hostLinks(t); !slices.Equal(before, after) {
		t.Errorf("host links changed: before %v, after %v", before, after)
	}
	wantReleased(t, tg, a)
}

// releaseWait is how long a plugin may take to release an address after
// DEL or GC answered: the spec does not ask for it to happen before.
const releaseWait = 5 * time.Second

func wantReleased(t *testing.T, tg Target, a attachment) {
	t.Helper()
	if tg.Allocated == nil {
		t.Log("not checked that the address was released: the target cannot tell (Target.Allocated is nil)")
		return
	}
	deadline := time.Now().Add(releaseWait)
	for {
		held, err := tg.Allocated(a.id, a.ifName)
		if err != nil {
			t.Fatal(err)
		}
		if !held {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("the address of %s/%s is still allocated %s after it was released", a.id, a.ifName, releaseWait)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func delTwice(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "deltwice")
	raw := tg.add(t, "1.1.0", a)
	conf := tg.conf(t, "1.1.0", map[string]any{"prevResult": json.RawMessage(raw)})
	for i := range 2 {
		wantSuccess(t, tg.call(t, "DEL", a.env(), conf), fmt.Sprintf("DEL #%d", i+1))
	}
	wantReleased(t, tg, a)
}

func delNetnsUnset(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "delnonetns")
	tg.add(t, "1.1.0", a)
	unset := a
	unset.netns = ""
	wantSuccess(t, tg.call(t, "DEL", unset.env(), tg.conf(t, "1.1.0", nil)), "DEL with CNI_NETNS unset")
	wantReleased(t, tg, a)
}

func delNetnsGone(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "delgone")
	tg.add(t, "1.1.0", a)
	if err := tg.RemoveNetNS(a.netns); err != nil {
		t.Fatal(err)
	}
	wantSuccess(t, tg.call(t, "DEL", a.env(), tg.conf(t, "1.1.0", nil)), "DEL with the namespace deleted")
	wantReleased(t, tg, a)
}

func delNoPrevResult(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "delnoprev")
	tg.add(t, "1.1.0", a)
	wantSuccess(t, tg.call(t, "DEL", a.env(), tg.conf(t, "1.1.0", nil)), "DEL without prevResult")
	wantReleased(t, tg, a)
}

func delNeverAdded(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "delnever")
	wantSuccess(t, tg.call(t, "DEL", a.env(), tg.conf(t, "1.1.0", nil)), "DEL of a container never added")
}

func checkAfterAdd(t *testing.T, tg Target) {
	for _, v := range []string{"0.4.0", "1.0.0", "1.1.0"} {
		a := tg.newAttachment(t, "check"+strings.ReplaceAll(v, ".", ""))
		raw := tg.add(t, v, a)
		o := tg.call(t, "CHECK", a.env(), tg.conf(t, v, map[string]any{"prevResult": json.RawMessage(raw)}))
		wantSuccess(t, o, "CHECK at "+v)
	}
}

// checkAfter adds, breaks the namespace with breakIt, and wants CHECK to
// fail.
func checkAfter(t *testing.T, tg Target, id string, breakIt func(h *netlink.Handle, link netlink.Link, raw []byte)) {
	a := tg.newAttachment(t, id)
	raw := tg.add(t, "1.1.0", a)
	h := inNetNS(t, a.netns)
	link, err := h.LinkByName(a.ifName)
	if err != nil {
		t.Fatal(err)
	}
	breakIt(h, link, raw)
	o := tg.call(t, "CHECK", a.env(), tg.conf(t, "1.1.0", map[string]any{"prevResult": json.RawMessage(raw)}))
	if o.exit == 0 {
		t.Fatal("CHECK passed")
	}
	if o.cniErr == nil {
		t.Fatalf("error is not the spec's JSON: %s", o)
	}
}

func checkAddressRemoved(t *testing.T, tg Target) {
	checkAfter(t, tg, "chkaddr", func(h *netlink.Handle, link netlink.Link, raw []byte) {
		res := parseResult(t, raw)
		ipn := res.IPs[0].Address
		if err := h.AddrDel(link, &netlink.Addr{IPNet: &ipn}); err != nil {
			t.Fatal(err)
		}
	})
}

func checkInterfaceRemoved(t *testing.T, tg Target) {
	checkAfter(t, tg, "chkiface", func(h *netlink.Handle, link netlink.Link, _ []byte) {
		if err := h.LinkDel(link); err != nil {
			t.Fatal(err)
		}
	})
}

func checkTolerates(t *testing.T, tg Target) {
	a := tg.newAttachment(t, "chktolerate")
	raw := tg.add(t, "1.1.0", a)
	h := inNetNS(t, a.netns)
	link, err := h.LinkByName(a.ifName)
	if err != nil {
		t.Fatal(err)
	}
	// What a chained plugin might add: another address and a route.
	extra := &net.IPNet{IP: net.IPv4(192, 0, 2, 7), Mask: net.CIDRMask(32, 32)}
	if err := h.AddrAdd(link, &netlink.Addr{IPNet: extra}); err != nil {
		t.Fatal(err)
	}
	if err := h.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4(192, 0, 2, 0), Mask: net.CIDRMask(24, 32)}, Scope: netlink.SCOPE_LINK}); err != nil {
		t.Fatal(err)
	}
	o := tg.call(t, "CHECK", a.env(), tg.conf(t, "1.1.0", map[string]any{"prevResult": json.RawMessage(raw)}))
	wantSuccess(t, o, "CHECK after a chained plugin's changes")
}

func checkDaemonDown(t *testing.T, tg Target) {
	if tg.StopDaemon == nil {
		t.Skip("the plugin has no daemon")
	}
	a := tg.newAttachment(t, "chkdown")
	raw := tg.add(t, "1.1.0", a)
	stopDaemon(t, tg)
	o := tg.call(t, "CHECK", a.env(), tg.conf(t, "1.1.0", map[string]any{"prevResult": json.RawMessage(raw)}))
	if o.exit == 0 || o.cniErr == nil {
		t.Fatalf("CHECK with the daemon down: %s, want the spec's error", o)
	}
}

func stopDaemon(t *testing.T, tg Target) {
	t.Helper()
	if err := tg.StopDaemon(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := tg.StartDaemon(); err != nil {
			t.Errorf("restart the daemon: %v", err)
		}
	})
}

func statusReady(t *testing.T, tg Target) {
	wantSuccess(t, tg.call(t, "STATUS", nil, tg.conf(t, "1.1.0", nil)), "STATUS")
}

func statusDaemonDown(t *testing.T, tg Target) {
	if tg.StopDaemon == nil {
		t.Skip("the plugin has no daemon")
	}
	stopDaemon(t, tg)
	wantError(t, tg.call(t, "STATUS", nil, tg.conf(t, "1.1.0", nil)), types.ErrPluginNotAvailable, "")
}

// gcAttachments renders attachments as the GC keys carry them.
func gcAttachments(as ...attachment) []types.GCAttachment {
	out := []types.GCAttachment{}
	for _, a := range as {
		out = append(out, types.GCAttachment{ContainerID: a.id, IfName: a.ifName})
	}
	return out
}

func gcReleases(t *testing.T, tg Target) {
	keep, stale := tg.newAttachment(t, "gckeep"), tg.newAttachment(t, "gcstale")
	raw := tg.add(t, "1.1.0", keep)
	tg.add(t, "1.1.0", stale)
	o := tg.call(t, "GC", nil, tg.conf(t, "1.1.0", map[string]any{"cni.dev/valid-attachments": gcAttachments(keep)}))
	wantSuccess(t, o, "GC")
	if len(strings.TrimSpace(string(o.stdout))) != 0 {
		t.Errorf("GC printed %q on success, want nothing", o.stdout)
	}
	wantReleased(t, tg, stale)
	chk := tg.call(t, "CHECK", keep.env(), tg.conf(t, "1.1.0", map[string]any{"prevResult": json.RawMessage(raw)}))
	wantSuccess(t, chk, "CHECK of the attachment GC was told to keep")
}

func gcBothKeys(t *testing.T, tg Target) {
	keep := tg.newAttachment(t, "gclegacy")
	raw := tg.add(t, "1.1.0", keep)
	// Only the key the 1.1.0 tag of the spec used.
	o := tg.call(t, "GC", nil, tg.conf(t, "1.1.0", map[string]any{"cni.dev/attachments": gcAttachments(keep)}))
	wantSuccess(t, o, "GC")
	chk := tg.call(t, "CHECK", keep.env(), tg.conf(t, "1.1.0", map[string]any{"prevResult": json.RawMessage(raw)}))
	wantSuccess(t, chk, "CHECK of the attachment listed under cni.dev/attachments")
	if tg.Allocated != nil {
		if held, err := tg.Allocated(keep.id, keep.ifName); err != nil || !held {
			t.Errorf("GC released an attachment listed under cni.dev/attachments (%v)", err)
		}
	}
}
