// Glue between NiceGUI (Vue) and the editor application served from static/ditgraph/.
// The editor talks to /api/... itself; NiceGUI only provides the page and this mount point.
export default {
  template: `<div class="dg-root"></div>`,
  props: { staticUrl: String, version: String, defaultWorkflow: String },
  async mounted() {
    const module = await import(`${this.staticUrl}/ditgraph/editor.js?v=${this.version}`);
    this.editor = await module.mount(this.$el, {
      staticUrl: this.staticUrl,
      defaultWorkflow: this.defaultWorkflow,
    });
  },
  unmounted() {
    this.editor?.destroy();
  },
};
